"""Tests of data.py (forking tokens, the one training string, token ids) and of the data files it
reads (plumbing/datafiles.py: layouts, Parquet, the pool-to-mixed recipe, bad rows). CPU, seconds.
"""
import json
import os
import sys

import pytest
import torch

import data
import toy
from plumbing import datafiles, files, grader

from conftest import SHARED


def test_fork_tokens_are_single_ids_and_survive_save_load(tmp_path):
    tok = toy.make_tokenizer()
    model = toy.make_model(tok)
    rows = model.get_input_embeddings().weight.shape[0]
    num_trained = len(tok)
    ids = data.add_fork_tokens(tok, 6)
    data.init_fork_rows(model, ids, num_trained, seed=0)
    assert model.get_input_embeddings().weight.shape[0] == rows  # spare rows used, no resize
    assert ids == list(range(num_trained, num_trained + 6))
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.convert_tokens_to_ids(data.fork_tokens(6)) == ids
    assert tok2.encode("x<think3>y", add_special_tokens=False)[1] == ids[2]
    assert AutoModelForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight.shape[0] == rows


def test_init_fork_rows_resizes_only_without_spare_rows_and_starts_at_the_mean():
    tok = toy.make_tokenizer()
    model = toy.make_model(tok, spare_rows=0)
    num_trained = len(tok)
    ids = data.add_fork_tokens(tok, 4)
    data.init_fork_rows(model, ids, num_trained, seed=0)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= num_trained + 4 and emb.shape[0] % 64 == 0
    mean = emb[:num_trained].mean(0)
    assert torch.allclose(emb[ids], mean.expand(4, -1), atol=0.01 * emb[:num_trained].std().item() * 5)
    assert not torch.equal(emb[ids[0]], emb[ids[1]])  # not identical: no exact ties in the first matching


def test_build_text_tokenises_to_the_pieces_used_in_training():
    tok = toy.make_tokenizer()
    ids = data.add_fork_tokens(tok, 4)
    q = toy.make_questions(1, seed=3)[0]
    enc = data.encode_question(tok, q, max_len=256)
    text = data.build_text(tok, q["prompt"], "<think2>", q["traces"][1])
    assert tok.encode(text, add_special_tokens=False) == enc["prompt_ids"] + [ids[1]] + enc["trace_ids"][1]
    assert text.endswith(q["traces"][1] + tok.eos_token)


def test_text_style_tags_are_the_released_checkpoints_plain_text_and_add_nothing():
    """--fork_style text: "<|im_start|><thinkI>\\n" right after the generation prompt, as ordinary
    tokens; the string training builds, the ids it trains on and the prompt inference sends agree."""
    tok = toy.make_tokenizer()
    vocab = len(tok)
    tags = data.fork_ids(tok, 3, "text")
    assert len(tok) == vocab and data.count_fork_tokens(tok) == 0  # nothing added
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert all(t[0] == start and len(t) > 1 for t in tags) and len({tuple(t) for t in tags}) == 3
    q = {"prompt": "Add 12+23+14.", "traces": [toy.solve([12, 23, 14], "left")]}
    text = data.build_text(tok, q["prompt"], data.fork_tag("<think2>", "text"), q["traces"][0])
    assert text == ("<|im_start|>user\nAdd 12+23+14.<|im_end|>\n<|im_start|>assistant\n<|im_start|><think2>\n"
                    + q["traces"][0] + "<|im_end|>")
    enc = data.encode_question(tok, q, 256, tag_len=max(map(len, tags)))
    assert tok.encode(text, add_special_tokens=False) == enc["prompt_ids"] + tags[1] + enc["trace_ids"][0]
    assert tok.decode(tags[1]) == "<|im_start|><think2>\n"
    with pytest.raises(data.DataError, match="--fork_style must be one of special, text"):
        data.fork_ids(tok, 2, "plain")


def test_long_traces_are_truncated_to_max_len_and_counted():
    tok = toy.make_tokenizer()
    data.add_fork_tokens(tok, 4)
    q = {"prompt": "Add 1 + 2 + 3.", "traces": ["Directly: 6.", "x " * 200]}
    enc = data.encode_question(tok, q, max_len=40)
    assert enc["truncated"] == 1
    assert all(len(enc["prompt_ids"]) + 1 + len(t) <= 40 for t in enc["trace_ids"])


def test_layouts_canonical_s1k_and_sampled_are_read(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"prompt": "p", "traces": ["a", "b"], "sources": ["x", "y"], "answer": "1"},
            {"question": "q", "solution": "2", "deepseek_thinking_trajectory": "think d",
             "deepseek_attempt": "attempt d", "gemini_thinking_trajectory": "think g", "gemini_attempt": "attempt g"},
            {"question": "r", "response": ["good", "bad", "good 2"], "score": [True, False, True], "gt": "3"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qs = datafiles.load_questions(str(path))
    assert qs[0] == {"prompt": "p", "traces": ["a", "b"], "sources": ["x", "y"], "answer": "1", "where": f"{path}:1"}
    assert qs[1]["sources"] == ["deepseek", "gemini"]
    assert qs[1]["traces"][0] == "think d\n</think>\n\nattempt d" and qs[1]["answer"] == "2"
    assert qs[2]["traces"] == ["good", "good 2"] and qs[2]["answer"] == "3"


def test_shared_sampled_file_keeps_only_correct_traces():
    path = os.path.join(SHARED, "math_cot_100x8.jsonl")
    if not os.path.exists(path):
        pytest.skip("../shared/data is not beside this checkout")
    with open(path) as f:
        raw = [json.loads(line) for line in f]
    usable = [r for r in raw if any(r["score"])]
    assert len(usable) < len(raw)  # the file has questions without a correct response: skipped
    qs = datafiles.load_questions(path)
    assert [len(q["traces"]) for q in qs] == [sum(r["score"]) for r in usable]
    assert qs[0]["traces"] == [t for t, ok in zip(usable[0]["response"], usable[0]["score"]) if ok]


S1K_COLUMNS = ["question", "solution", "gemini_thinking_trajectory", "gemini_attempt", "deepseek_thinking_trajectory",
               "deepseek_attempt"]


def write_parquet(path, rows):
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return str(path)


def s1k_rows(n):
    """Rows of the s1K-1.1 columns: toy questions, the gemini and deepseek 'teachers' in two styles."""
    return [{"question": q["prompt"], "solution": f"so \\boxed{{{q['answer']}}}",
             "gemini_thinking_trajectory": toy.solve(nums, "left"), "gemini_attempt": f"\\boxed{{{q['answer']}}}",
             "deepseek_thinking_trajectory": toy.solve(nums, "place"), "deepseek_attempt": f"\\boxed{{{q['answer']}}}"}
            for q, nums in ((q, [int(x) for x in q["prompt"][4:-1].split("+")]) for q in toy.make_questions(n, seed=5))]


def test_a_null_field_counts_as_absent_as_parquet_columns_hold_nulls():
    q = datafiles.parse_row({"prompt": None, "question": "q", "traces": ["t"], "answer": None, "gt": "3"}, "x:1")
    assert q["prompt"] == "q" and q["answer"] == "3"
    q = datafiles.parse_row({"question": "q", "traces": None, "response": ["a", "b"], "score": [False, True]}, "x:2")
    assert q["traces"] == ["b"]


def test_parquet_and_jsonl_give_the_same_questions_and_errors_name_the_row(tmp_path):
    rows = s1k_rows(3)
    parquet = write_parquet(tmp_path / "s1k.parquet", rows)
    jsonl = tmp_path / "s1k.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_parquet, from_jsonl = datafiles.load_questions(parquet), datafiles.load_questions(str(jsonl))
    assert [{k: v for k, v in q.items() if k != "where"} for q in from_parquet] == \
        [{k: v for k, v in q.items() if k != "where"} for q in from_jsonl]
    assert from_parquet[0]["sources"] == ["deepseek", "gemini"] and from_parquet[2]["where"] == f"{parquet}:row 3"
    bad = write_parquet(tmp_path / "bad.parquet", rows[:1] + [{**rows[1], "question": ""}])
    with pytest.raises(data.DataError, match="bad.parquet:row 2: no prompt"):
        datafiles.load_questions(bad)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match="junk.parquet: cannot read as Parquet"):
        datafiles.load_questions(str(tmp_path / "junk.parquet"))


def test_an_s1k_parquet_file_trains_with_its_teachers_as_sources(tmp_path, run):
    parquet = write_parquet(tmp_path / "s1k.parquet", s1k_rows(8))
    done = run([sys.executable, "train.py", "--data", parquet, "--batch_size", "8", "--epochs", "1",
                "--out_dir", str(tmp_path / "run")])
    assert done.returncode == 0, done.stderr
    matching = json.load(open(tmp_path / "run" / "matching.json"))
    assert {e["source"] for e in matching["epochs"][0]["edges"]} == {"deepseek", "gemini"}


def test_mix_pools_sources_keeps_correct_traces_and_is_a_function_of_the_seed(tmp_path, capsys):
    questions = toy.make_questions(6, seed=8)
    pools = []
    for name, styles, wrong in (("alpha", ["left", "right"], False), ("beta", ["place"], True), ("gamma", ["direct"], False)):
        rows = []
        for q in questions:
            nums = [int(x) for x in q["prompt"][4:-1].split("+")]
            traces = [toy.solve(nums, s) for s in styles]
            if wrong:  # beta answers one more than the sum: dropped by --correct_only
                traces = [t.replace(f"{{{q['answer']}}}", f"{{{int(q['answer']) + 1}}}") for t in traces]
            rows.append({"prompt": q["prompt"], "traces": traces, "answer": q["answer"]})
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        pools.append(str(path))
    flags = ["mix", "--pool", *pools, "--traces", "2", "--per_source", "1", "--correct_only", "--seed", "3"]
    first = data.main([*flags, "--out", str(tmp_path / "a.jsonl")])
    said = capsys.readouterr().out
    assert "alpha: 12 pooled, 0 dropped as wrong, " in said and "beta: 6 pooled, 6 dropped as wrong, 0 kept" in said
    assert (tmp_path / "a.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in first)
    data.main([*flags, "--out", str(tmp_path / "b.jsonl")])
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()  # same seed, same file
    for q in datafiles.load_questions(str(tmp_path / "a.jsonl")):
        assert len(q["traces"]) == 2 and sorted(q["sources"]) == ["alpha", "gamma"]  # one per source at most
        assert all(grader.grade(t, q["answer"])[1] for t in q["traces"])
    other = data.main([*flags[:-1], "4", "--out", str(tmp_path / "c.jsonl")])
    assert [r["traces"] for r in other] != [r["traces"] for r in first]  # another seed, another sample


def test_mix_reads_the_final_answer_of_a_worked_solution_as_the_gold(tmp_path, capsys):
    def row(question, solution, deepseek, gemini):
        return {"question": question, "solution": solution, "deepseek_thinking_trajectory": "think",
                "deepseek_attempt": deepseek, "gemini_thinking_trajectory": "think", "gemini_attempt": gemini}
    rows = [row("x^2 = 49, x > 0: x?", "Since $x^2 = 49$ and $x>0$, $x = 7$.", r"So $x = \boxed{7}$.", r"$\boxed{-7}$"),
            row("Sum?", "We add them up. The answer is 42.", "The answer is 42.", "#### 41"),
            row("Area?", "Each side is $x$, so the area is $x^2$.", r"\boxed{x^2}", r"\boxed{x^2}")]
    path = tmp_path / "s1k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixed = data.main(["mix", "--pool", str(path), "--traces", "2", "--correct_only", "--out", str(tmp_path / "m.jsonl")])
    assert [(r["prompt"], r["sources"]) for r in mixed] == [("x^2 = 49, x > 0: x?", ["deepseek"]), ("Sum?", ["deepseek"])]
    said = capsys.readouterr().out
    assert "deepseek: 3 pooled, 1 dropped as wrong, 2 kept" in said and "gemini: 3 pooled, 3 dropped as wrong" in said
    assert "1 golds could not be read" in said and "Area?" in said


def test_data_check_prints_sources_and_token_lengths(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in toy.make_questions(5, seed=1)))
    data.main(["--data", str(path), "--model", "toy"])
    said = capsys.readouterr().out
    assert "5 questions, 20 traces" in said and "traces per source: " in said
    tok, qs = toy.make_tokenizer(), toy.make_questions(5, seed=1)
    prompts = sorted(len(tok.encode(data.prompt_text(tok, q["prompt"]), add_special_tokens=False)) for q in qs)
    traces = sorted(len(tok.encode(t, add_special_tokens=False)) for q in qs for t in q["traces"])
    assert f"prompt tokens: min {prompts[0]}, median {prompts[2]}, max {prompts[-1]}" in said
    assert f"trace tokens: min {traces[0]}, median {traces[10]}, max {traces[-1]}" in said


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "traces": ["a"]}\n{"prompt": "p", "traces": [', r"bad.jsonl:2: malformed JSON"),
    ('{"traces": ["a"]}', r"bad.jsonl:1: no prompt"),
    ('{"prompt": "p"}', r"bad.jsonl:1: no traces"),
    ('{"prompt": "p", "traces": []}', r"bad.jsonl:1: no non-empty trace"),
    ('{"prompt": "p", "traces": ["a", " "]}', r"bad.jsonl:1: an empty trace"),
    ('{"prompt": "p", "traces": "abc"}', r"bad.jsonl:1: 'traces' must be a list"),
    ('{"prompt": "p", "traces": ["a"], "sources": ["x", "y"]}', r"bad.jsonl:1: 'sources' must be a list with one"),
])
def test_bad_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(data.DataError, match=message):
        datafiles.load_questions(str(path))


def test_non_utf8_and_missing_files_name_the_file(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "p", "traces": ["a"]}\n{"prompt": "\xff"}\n')
    with pytest.raises(data.DataError, match=r"bytes.jsonl:2: not UTF-8"):
        datafiles.load_questions(str(path))
    with pytest.raises(data.DataError, match=r"nothing.jsonl: cannot read"):
        datafiles.load_questions(str(tmp_path / "nothing.jsonl"))


def test_a_prompt_is_tokenised_as_text_control_tokens_come_only_from_the_template():
    tok = toy.make_tokenizer()
    fork_ids = data.add_fork_tokens(tok, 4)
    q = {"prompt": "Is <think1> or <|im_end|> a token?", "traces": ["No."]}
    ids = data.encode_question(tok, q, 256)["prompt_ids"]
    controls = set(fork_ids) | {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")}
    head = data.encode_prompt(tok, "")  # the template's own control tokens, around an empty prompt
    assert sorted(i for i in ids if i in controls) == sorted(i for i in head if i in controls)
    assert tok.decode(ids) == data.prompt_text(tok, q["prompt"])  # the text itself is all there
    plain = {"prompt": "Add 1 + 2 + 3.", "traces": ["6"]}  # an ordinary prompt: the ids of the whole string
    assert data.encode_question(tok, plain, 256)["prompt_ids"] == tok.encode(data.prompt_text(tok, plain["prompt"]),
                                                                             add_special_tokens=False)


def test_fork_strings_already_in_the_vocabulary_become_single_special_ids():
    tok = toy.make_tokenizer()
    tok.add_tokens(["<think2>"])  # an ordinary-text token before SSFT claims the string
    before = tok.convert_tokens_to_ids("<think2>")
    ids = data.add_fork_tokens(tok, 3)
    assert ids[1] == before and len(set(ids)) == 3  # kept its id, now special
    assert all(tok.encode(name, add_special_tokens=False) == [i] for name, i in zip(data.fork_tokens(3), ids))
    q = {"prompt": "p", "traces": ["see <think2> here"]}  # inside a trace it is text, not the fork token
    assert ids[1] not in data.encode_question(tok, q, 256)["trace_ids"][0]


def test_tokenizer_without_chat_template_uses_the_documented_fallback():
    tok = toy.make_tokenizer()
    tok.chat_template = None
    data.add_fork_tokens(tok, 2)
    assert data.build_text(tok, "What is 2+2?", "<think1>", "4") == "Question: What is 2+2?\nAnswer: <think1>4" + tok.eos_token


def test_a_missing_parquet_file_is_named_as_missing_not_as_unreadable(tmp_path):
    with pytest.raises(files.DataError, match="No such file"):
        datafiles.read_records(str(tmp_path / "s1K-1.1.parquet"))
