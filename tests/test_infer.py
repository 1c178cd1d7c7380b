"""Tests of infer.py, score.py and select_token.py on the CPU: metrics on hand-built responses,
shared-prefix decoding against independent decoding, resuming, scoring, and the Eq. 6 token choice.

    python -m pytest -q test_infer.py
"""
import copy
import json
import os
import random
import shutil

import pytest
import torch

import data
import infer
import toy
from plumbing import decoding, evalfiles, files, inferrun

NUM_FORKS = 4


@pytest.fixture(scope="module")
def noisy():
    """A tiny Qwen2 with forking tokens and weights random enough that greedy continuations differ
    between forking tokens (the toy init gives the N rows almost equal embeddings)."""
    tokenizer = toy.make_tokenizer()
    fork_ids = data.add_fork_tokens(tokenizer, NUM_FORKS)
    torch.manual_seed(0)
    model = toy.make_model(tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return tokenizer, model.eval(), fork_ids


@pytest.fixture(scope="module")
def model_dir(noisy, tmp_path_factory):
    """What train.py leaves in final/: model and tokenizer (with the forking tokens) in one directory."""
    tokenizer, model, _ = noisy
    path = tmp_path_factory.mktemp("final")
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)  # bf16, as train.py saves it
    tokenizer.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- answers

def test_problems_load_from_every_layout(tmp_path):
    s1k = tmp_path / "s1k.jsonl"
    s1k.write_text(json.dumps({"question": "2 + 2?", "solution": "so \\boxed{4}", "deepseek_thinking_trajectory": "4",
                               "deepseek_attempt": "4"}) + "\n" + json.dumps({"prompt": "1 + 1?", "traces": ["2"],
                                                                               "answer": "2"}) + "\n")
    assert [(p["id"], p["gold"]) for p in evalfiles.load_problems(str(s1k), "", 0)] == [(0, "4"), (1, "2")]
    assert evalfiles.load_problems("toy", " Think.", 3, toy.held_out_records(3))[2]["prompt"].endswith("Think.")
    shared = {"math500": (500, "test/precalculus/807.json"), "aime24": (30, 0), "gsm8k_test": (1319, 0),
              "gsm8k_test_4models": (1319, 0), "amc23": (40, 0), "math_cot_100x8": (100, 0)}
    for name, (count, first_id) in shared.items():
        path = f"../shared/data/{name}.jsonl"
        if os.path.exists(path):
            problems = evalfiles.load_problems(path, "", 0)
            assert len(problems) == count and problems[0]["id"] == first_id, name
            if name.startswith("gsm8k"):
                assert problems[0]["gold"] == "18"


# ----------------------------------------------------------------------------- metrics

def test_top_p_samples_only_inside_the_nucleus():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    assert set(decoding.sample(logits, 1.0, 0.7, g).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(decoding.sample(logits, 1.0, 0.85, g).tolist()) == {0, 1, 2}
    assert set(decoding.sample(logits, 1.0, 1.0, g).tolist()) == {0, 1, 2, 3}
    assert set(decoding.sample(logits, 0.0, 0.7, g).tolist()) == {0}


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("style", ["special", "text"])
def test_shared_prefix_generation_equals_independent_generation_under_greedy(noisy, style):
    """One prefill shared by all responses == each response's whole prompt through HF generate, for
    one-token tags and for text tags of several tokens (of different lengths: <think1> .. <think12>)."""
    tokenizer, model, fork_ids = noisy
    prefix = data.encode_prompt(tokenizer, "Add 12+23+14.")
    tags = [[f] for f in fork_ids] if style == "special" else data.fork_ids(tokenizer, 12, "text")[8:]
    starts = tags + tags[:2]  # 6 responses: the 4 tags, then the first 2 again
    assert style == "special" or len({len(s) for s in starts}) > 1
    refs = []
    for s in starts:  # independent: the whole prompt with its own tag, through HF generate
        out = model.generate(torch.tensor([prefix + s]), do_sample=False, max_new_tokens=12,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        refs.append(out[0, len(prefix) + len(s):].tolist())
    assert len({tuple(r) for r in refs}) > 1, "responses should differ between forking tokens"
    # a stop token that ends some responses early, so rows leave the batch mid-way
    stop = next(t for r in refs for t in r[3:] if t not in r[:3])
    cut = [(r[:r.index(stop)], True) if stop in r else (r, False) for r in refs]
    for batch_size in (0, 4):
        got = decoding.generate(model, prefix, starts, 12, 0.0, 1.0, {stop}, torch.Generator(), batch_size)
        assert got == cut


def test_many_prompts_decoded_together_equal_each_prompt_decoded_alone_under_greedy(noisy):
    """decoding.generate_many (gfpo.py's rollouts: prompts of different lengths left-padded in one
    batch, max_rows at a time) == decoding.generate prompt by prompt, stop token and tag ban included."""
    tokenizer, model, fork_ids = noisy
    prompts = [data.encode_prompt(tokenizer, p) for p in ("Add 12+23+14.", "Add 1+2+3+4+5, then more words.", "Hi")]
    starts = [[[f] for f in fork_ids], [[fork_ids[1]], [fork_ids[2]]], [[fork_ids[3]]] * 3]
    free = decoding.generate(model, prompts[0], starts[0], 12, 0.0, 1.0, set(), torch.Generator())
    banned = {free[0][0][0]}  # the first token of a response: the ban changes it

    def each_alone(stop_ids):
        return [decoding.generate(model, p, s, 12, 0.0, 1.0, stop_ids, torch.Generator(), banned=banned)
                for p, s in zip(prompts, starts)]
    stop = next(t for row in each_alone(set()) for ids, _ in row for t in ids[3:] if t not in ids[:3])
    alone = each_alone({stop})
    assert any(done for row in alone for _, done in row) and all(t not in banned for row in alone
                                                                  for ids, _ in row for t in ids)
    for max_rows in (0, 2, 5):
        assert decoding.generate_many(model, prompts, starts, 12, 0.0, 1.0, {stop}, torch.Generator(), max_rows,
                                      banned, tokenizer.pad_token_id) == alone, max_rows


def test_fork_auto_samples_at_the_temperature_gfpo_trained(model_dir, tmp_path):
    """--auto_choice sample draws at final/ssft.json's fork_temperature (gfpo.py writes it), not at
    T = 1: at T = 0.01 every draw is the most likely tag."""
    sharp = tmp_path / "sharp"
    shutil.copytree(model_dir, sharp)
    saved = json.loads((sharp / "ssft.json").read_text()) if (sharp / "ssft.json").exists() else {}
    (sharp / "ssft.json").write_text(json.dumps({"fork_style": "special", "num_forks": NUM_FORKS, **saved,
                                                 "fork_temperature": 0.01}))
    assert inferrun.trained_temperature(str(sharp)) == 0.01 and inferrun.trained_temperature(str(model_dir)) == 1.0
    for i, (path, spread) in enumerate(((sharp, False), (model_dir, True))):
        output = tmp_path / f"rows{i}.jsonl"
        infer.main(infer.parse_config(["--model", str(path), "--data", write_problems(tmp_path / "p.jsonl"),
                                       "--fork", "auto", "--auto_choice", "sample", "--samples", "16",
                                       "--max_new_tokens", "2", "--output", str(output)]))
        rows = [json.loads(line) for line in open(output)]
        forks = [{c["fork"] for c in r["completions"]} for r in rows]
        best = [{max(r["fork_policy"], key=r["fork_policy"].get)} for r in rows]
        assert (forks != best) == spread, (path, forks, [r["fork_policy"] for r in rows])


# ----------------------------------------------------------------------------- infer.py end to end

def write_problems(path, n=4):
    rows = toy.make_questions(n, seed=1)
    path.write_text("".join(json.dumps({"problem": r["prompt"], "answer": int(r["answer"]), "unique_id": f"q{i}"})
                            + "\n" for i, r in enumerate(rows)))
    return str(path)


def run_infer(model_dir, data_path, output, *flags):
    return infer.main(infer.parse_config(["--model", model_dir, "--data", data_path, "--output", str(output),
                                          "--samples", "6", "--max_new_tokens", "5", *flags]))


def read_ids(path):
    return [json.loads(line)["id"] for line in open(path)]


def test_interrupted_run_resumes_without_redoing_or_duplicating_problems(model_dir, tmp_path, monkeypatch):
    data_path = write_problems(tmp_path / "problems.jsonl")
    whole = run_infer(model_dir, data_path, tmp_path / "whole.jsonl")
    out = tmp_path / "resumed.jsonl"
    solve, calls = infer.solve, []

    def killed_after_two(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[2]["id"])
        return solve(*args)
    monkeypatch.setattr(infer, "solve", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_infer(model_dir, data_path, out)
    assert read_ids(out) == ["q0", "q1"]
    with open(out, "a") as f:
        f.write('{"id": "q2", "gold": "1')  # killed in the middle of writing a row
    calls.clear()
    monkeypatch.setattr(infer, "solve", lambda *args: calls.append(args[2]["id"]) or solve(*args))
    resumed = run_infer(model_dir, data_path, out)
    assert calls == ["q2", "q3"] and read_ids(out) == ["q0", "q1", "q2", "q3"]
    # problem i samples with seed + i, so the resumed file equals an uninterrupted run's
    assert open(out).read() == open(tmp_path / "whole.jsonl").read() and resumed == whole
    assert {"pass@1", "cons@2", "cons@4", "cons@6", "pass@6", "native_cons@4"} <= set(whole)
    assert json.load(open(tmp_path / "resumed.metrics.json")) == whole
    row = json.loads(open(out).readline())
    assert [c["fork"] for c in row["completions"]] == data.fork_tokens(NUM_FORKS) + data.fork_tokens(2)
    assert {"text", "pred", "correct", "tokens", "finished"} <= set(row["completions"][0])


def test_resume_refuses_other_generation_settings_before_loading_a_model(model_dir, tmp_path, monkeypatch):
    data_path = write_problems(tmp_path / "problems.jsonl", n=1)
    run_infer(model_dir, data_path, tmp_path / "out.jsonl")
    monkeypatch.setattr(infer, "init_distributed", lambda: pytest.fail("got past the checks"))
    with pytest.raises(SystemExit, match="--temperature 0.7"):
        run_infer(model_dir, data_path, tmp_path / "out.jsonl", "--temperature", "1.0")


def test_bad_input_names_the_file_and_line_or_flag(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?"}\n')
    with pytest.raises(data.DataError, match=f"{bad}:2: need a prompt"):
        run_infer(model_dir, str(bad), tmp_path / "out.jsonl")
    bad.write_text('{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?", "answer": \n')
    with pytest.raises(data.DataError, match=f"{bad}:2: malformed JSON"):
        run_infer(model_dir, str(bad), tmp_path / "out.jsonl")
    with pytest.raises(SystemExit, match="--fork <think9>"):
        run_infer(model_dir, write_problems(tmp_path / "ok.jsonl", n=1), tmp_path / "out.jsonl", "--fork", "<think9>")
    with pytest.raises(SystemExit):  # a GGUF file is pointed to tools/smollm2.py
        infer.parse_config(["--model", str(tmp_path / "m.gguf"), "--data", "toy"])
    assert "is a GGUF file: make a folder of it once" in capsys.readouterr().err


def test_bad_model_or_ids_give_one_line_and_a_refused_start_leaves_nothing_behind(model_dir, tmp_path, capsys):
    problems = write_problems(tmp_path / "ok.jsonl", n=1)
    out = tmp_path / "out.jsonl"
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    for model in (str(not_a_model), problems):
        with pytest.raises(SystemExit, match=f"--model {model}: cannot load a tokenizer"):
            run_infer(model, problems, out)
    with pytest.raises(SystemExit):
        run_infer(model_dir, problems, out, "--temperature", "nan")
    assert "--temperature: expected a finite number, got 'nan'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--fork <think9>"):
        run_infer(model_dir, problems, out, "--fork", "<think9>")
    assert sorted(os.listdir(tmp_path)) == ["empty", "ok.jsonl"]  # no config locks out the corrected command
    (tmp_path / "out.config.json").write_text(json.dumps({"temperature": 1.5}))  # settings of a run with no rows
    assert run_infer(model_dir, problems, out)["problems"] == 1  # compared only when rows exist
    for bad_id in ([1, 2], {"a": 1}, True):  # (a null id is an absent one: the row's position)
        (tmp_path / "ids.jsonl").write_text(json.dumps({"problem": "1 + 1?", "answer": "2", "id": bad_id}) + "\n")
        with pytest.raises(data.DataError, match="ids.jsonl:1: an id must be a string or an integer"):
            run_infer(model_dir, str(tmp_path / "ids.jsonl"), out)


def test_prompts_follow_lighteval_for_evaluation_files_and_training_as_it_was(tmp_path):
    rows = [{"problem": "What is 1+1?", "answer": "2"},  # an evaluation file: LightEval's math prompt
            {"prompt": "Add 1+2+3.", "traces": ["6"], "answer": "6"},  # a training layout: as trained
            {"Question": "Which?", "Correct Answer": "right", "Incorrect Answer 1": "w1",  # GPQA's columns
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3", "Record ID": "rec1"},
            {"question": "Pick", "choices": ["a", "b", "c", "d"], "answer": "C"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    math_, plain, gpqa, generic = evalfiles.load_problems(str(path))
    assert math_["prompt"] == evalfiles.MATH_TEMPLATE.replace("{question}", "What is 1+1?") and math_["kind"] == "math"
    assert math_["prompt"].startswith("Solve the following math problem efficiently and clearly.  The last line")
    assert plain["prompt"] == "Add 1+2+3." and evalfiles.load_problems("toy", records=toy.held_out_records(100))[0]["template"] == "{question}"
    place = random.Random(1234).randint(0, 3)  # LightEval: one generator seeded 1234, a draw per problem
    choices = ["w1", "w2", "w3"]
    choices.insert(place, "right")
    assert gpqa["id"] == "rec1" and gpqa["kind"] == "choice" and gpqa["gold"] == "ABCD"[place]
    assert gpqa["prompt"] == evalfiles.CHOICE_TEMPLATE.replace("{question}", "Which?\n\n" + "\n".join(
        f"{letter}) {c}" for letter, c in zip("ABCD", choices)))
    assert generic["gold"] == "C" and generic["prompt"].endswith("\n\nA) a\nB) b\nC) c\nD) d")
    assert evalfiles.load_problems(str(path), "none")[0]["prompt"] == "What is 1+1?"
    assert evalfiles.load_problems(str(path), " Box it.")[0]["prompt"] == "What is 1+1? Box it."
    assert evalfiles.load_problems(str(path), "Q: {question}\nA:")[0]["prompt"] == "Q: What is 1+1?\nA:"


def test_show_prompts_of_the_official_protocol_print_the_authors_prompt_and_text_tags(model_dir, tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "shared", "data", "math500.jsonl")
    if not os.path.exists(path):
        path = tmp_path / "math500.jsonl"
        path.write_text(json.dumps({"problem": "Convert the point $(0,3)$.", "answer": "(3, \\frac{\\pi}{2})"}) + "\n")
    cfg = infer.parse_config(["--model", model_dir, "--data", str(path), "--protocol", "official", "--show_prompts"])
    assert (cfg.tag_order, cfg.samples, cfg.temperature, cfg.top_p, cfg.max_new_tokens) == ("block", 36, 0.7, 0.95, 32768)
    assert infer.parse_config(["--data", "x/aime24.jsonl", "--protocol", "official"]).samples == 66
    assert infer.parse_config(["--data", "x/aime24.jsonl", "--protocol", "official", "--fork", "<think1>"]).samples == 32
    assert infer.parse_config(["--protocol", "official", "--samples", "12"]).samples == 12  # a flag given wins
    infer.main(cfg)
    shown = capsys.readouterr().out
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    problem = evalfiles.load_problems(str(path), limit=1)[0]["prompt"]
    assert problem.startswith("Solve the following math problem efficiently and clearly.")
    first = data.prompt_text(tok, problem) + "<|im_start|><think1>\n"
    assert first in shown and "<|im_start|>assistant\n<|im_start|><think1>\n" in shown
    assert shown.count("<|im_start|><think") == 6 and "<think6>" in shown and not os.path.exists(tmp_path / "eval")


def test_block_order_gives_each_token_a_run_of_responses_and_is_recorded(model_dir, tmp_path):
    metrics = run_infer(model_dir, write_problems(tmp_path / "p.jsonl", n=2), tmp_path / "out.jsonl",
                        "--tag_order", "block", "--samples", "10")
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    names = data.fork_tokens(NUM_FORKS)
    assert [c["fork"] for c in rows[0]["completions"]] == [names[0]] * 3 + [names[1]] * 3 + [names[2]] * 2 + [names[3]] * 2
    assert rows[0]["tag_order"] == "block" and rows[0]["kind"] == "math"
    assert "native_cons@4" in metrics and metrics["per_fork"][names[0]]["responses"] == 6


def test_a_text_style_model_is_prompted_with_its_text_tags(noisy, tmp_path, capsys):
    tokenizer, model, _ = noisy
    path = tmp_path / "text_final"
    copy.deepcopy(model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    files.write_json(str(path / "ssft.json"), {"fork_style": "text", "num_forks": 3})  # as train.py writes it
    problems = write_problems(tmp_path / "p.jsonl", n=1)
    infer.main(infer.parse_config(["--model", str(path), "--data", problems, "--show_prompts"]))
    assert capsys.readouterr().out.count("<|im_start|>assistant\n<|im_start|><think") == 3
    run_infer(str(path), problems, tmp_path / "out.jsonl", "--max_new_tokens", "3")
    row = json.loads(open(tmp_path / "out.jsonl").readline())
    assert [c["fork"] for c in row["completions"]] == data.fork_tokens(3) * 2


def test_the_models_own_tags_win_over_the_official_protocols_and_a_wrong_count_is_named(model_dir, tmp_path, capsys):
    problems = write_problems(tmp_path / "p.jsonl", n=1)
    shutil.copytree(model_dir, tmp_path / "special")
    files.write_json(str(tmp_path / "special" / "ssft.json"), {"fork_style": "special", "num_forks": NUM_FORKS})
    infer.main(infer.parse_config(["--model", str(tmp_path / "special"), "--data", problems, "--protocol", "official",
                                   "--show_prompts"]))
    shown = capsys.readouterr().out
    assert "<|im_start|><think" not in shown and shown.count("-----") == NUM_FORKS  # its 4 reserved tokens
    with pytest.raises(SystemExit, match=f"holds {NUM_FORKS} reserved forking tokens, not 6"):
        run_infer(model_dir, problems, tmp_path / "out.jsonl", "--num_forks", "6")


def test_a_rows_file_whose_last_row_lacks_its_newline_is_read_whole(tmp_path):
    rows = [{"id": i, "gold": "7", "completions": [{"text": "\\boxed{7}"}]} for i in range(2)]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))  # as many tools write: no final newline
    assert [r["id"] for r in evalfiles.read_rows(str(path))] == [0, 1]
    files.append_jsonl(str(path), {"id": 2, "gold": "7", "completions": [{"text": "7"}]})
    assert [r["id"] for r in evalfiles.read_rows(str(path))] == [0, 1, 2]


def test_baseline_samples_from_the_plain_prompt_and_votes_in_blocks(model_dir, tmp_path):
    metrics = run_infer(model_dir, write_problems(tmp_path / "p.jsonl", n=2), tmp_path / "out.jsonl",
                        "--fork", "none", "--set_size", "3")
    rows = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    assert all(c["fork"] is None for r in rows for c in r["completions"]) and "native_cons@3" in metrics
    assert metrics["per_fork"]["none"]["responses"] == 12


def test_a_model_without_forking_tokens_is_pointed_to_the_baseline(tmp_path):
    """A plain model (no <thinkK> tokens, no ssft.json) under the default --fork all: the one error names
    --fork none, the way to sample it as a baseline, before any weights load."""
    tok = toy.make_tokenizer()
    tok.save_pretrained(tmp_path / "plain")
    for fork in ("all", "<think1>", "auto"):
        cfg = infer.parse_config(["--model", str(tmp_path / "plain"), "--data", "toy", "--fork", fork, "--limit", "1"])
        with pytest.raises(SystemExit, match="holds no forking tokens: --fork none samples it from the plain prompt"):
            infer.main(cfg)
    assert not os.path.exists(os.path.join("eval", "plain"))  # nothing written


def test_each_model_writes_its_own_rows_file_by_default():
    """Two models scored on one data file never share (or refuse to resume) a rows file."""
    names = [evalfiles.model_name(m) for m in ("out/ssft/final", "out/gfpo/final/", "Qwen/Qwen2.5-32B-Instruct", "final")]
    assert names == ["ssft", "gfpo", "Qwen2.5-32B-Instruct", "final"]
