"""CPU tests of the training side: data.py, match.py, train.py, toy.py and toy_compare.py (toy model).

    python -m pytest -q
"""
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import match
import score
import select_token
import toy
import toy_compare
import train
from plumbing import batching, concat, datafiles, figures, files, flags, grader, matchstats

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


# ----------------------------------------------------------------------------- layout of the project

SCRIPTS = {"train", "infer", "select_token", "gfpo"}  # stages run as scripts: nothing but a test imports them
LIBRARY_STAGES = {"data", "match", "policy", "score", "toy"}  # stages whose functions other stages call


def project_imports():
    """{file: the project modules it imports, at any depth in the file}: the stages and toy.py at the
    top level, plumbing/<name> as "plumbing.<name>", tools/<name> as "tools.<name>"."""
    import ast
    files = {f[:-3]: f for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith(("test_", "conftest"))}
    for folder in ("plumbing", "tools"):
        files.update({f"{folder}.{f[:-3]}": os.path.join(folder, f) for f in os.listdir(os.path.join(HERE, folder))
                      if f.endswith(".py") and f != "__init__.py"})
    graph = {}
    for m, path in files.items():
        tree = ast.parse(open(os.path.join(HERE, path)).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module == "plumbing":
                names |= {f"plumbing.{a.name}" for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                names.add(n.module)
        graph[m] = names & set(files) - {m}
    return graph


def test_stages_import_downward_only():
    """No import circle; plumbing imports no stage (it is the small boring library under them); a
    script stage (train, infer, select_token, gfpo) is imported by no other file, tests aside, so
    that a stage file is never a library for another stage; decoding lives in plumbing/decoding.py."""
    graph = project_imports()

    def reach(m, seen=()):
        return set().union(*({n} | reach(n, seen + (m,)) for n in graph[m] if n not in seen)) if graph[m] else set()
    for m in graph:
        assert m not in reach(m), f"{m} imports itself through {graph[m]}"
    stages = SCRIPTS | LIBRARY_STAGES
    assert stages <= set(graph), stages - set(graph)
    for m in graph:
        if m.startswith("plumbing."):
            assert not graph[m] & stages, f"plumbing file {m} imports the stage(s) {graph[m] & stages}"
        assert not graph[m] & SCRIPTS, f"{m} imports the script stage(s) {graph[m] & SCRIPTS}"
    assert graph["toy"] == set() and graph["score"] <= {"plumbing." + p for p in ("evalfiles", "files", "flags", "grader")}


@pytest.mark.parametrize("parse, argv, full", [
    (lambda argv: train.parse_config(argv), ["--max_step", "10"], "--max_steps"),
    (lambda argv: score.parse_config(argv), ["rows.jsonl", "--set", "4"], "--set_size"),
    (lambda argv: data.main(["mix", *argv]), ["--pool", "a.jsonl", "--trace", "2"], "--traces"),
    (lambda argv: flags.parse_flags(toy_compare.Config, "", argv), ["--seed=5"], "--seeds"),
], ids=["train", "score", "data-mix", "toy_compare"])
def test_an_abbreviated_flag_is_refused_and_the_full_name_suggested(parse, argv, full, capsys):
    """argparse would take --max_step as --max_steps (any unique prefix), so that a typo silently
    changes a run; every script's flags come from flags.parse_flags, which refuses it."""
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the usage above it lists every flag
    assert "unrecognized arguments" in error and f"did you mean {full}" in error, error


# ----------------------------------------------------------------------------- match.py

def brute_force(cost):
    """Eq. 3 by definition: the minimum over all injective maps of the smaller side."""
    n, m = cost.shape
    if n >= m:
        return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


@pytest.mark.parametrize("shape", [(4, 4), (6, 4), (5, 2), (3, 5), (1, 3), (4, 1)])
def test_hungarian_equals_bruteforce_over_injective_assignments(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.random(shape)
        forks, traces = match.hungarian(cost)
        assert len(forks) == len(traces) == min(shape)
        assert len(set(forks)) == len(forks) and len(set(traces)) == len(traces)  # injective
        if shape[0] >= shape[1]:
            assert sorted(traces) == list(range(shape[1]))  # every trace gets a token
        assert math.isclose(cost[forks, traces].sum(), brute_force(cost), rel_tol=1e-12)


def test_matching_gap_equals_mean_over_enumerated_other_assignments():
    rng = np.random.default_rng(0)
    for shape in [(4, 4), (6, 4), (3, 5)]:
        cost = rng.random(shape)
        forks, traces = match.hungarian(cost)
        n, m = shape
        maps = itertools.permutations(range(n), m) if n >= m else itertools.permutations(range(m), n)
        totals = [sum(cost[p[j], j] for j in range(m)) if n >= m else sum(cost[i, p[i]] for i in range(n))
                  for p in maps]
        best = cost[forks, traces].sum()
        others = sorted(totals)[1:]  # all but the optimum
        expected = (np.mean(others) - best) / min(n, m)
        assert math.isclose(match.matching_gap(cost, forks, traces), expected, rel_tol=1e-9)


def test_random_matching_is_injective_and_seeded():
    for n, m in [(6, 4), (4, 4), (3, 7)]:
        f1, t1 = match.random_matching(n, m, np.random.default_rng(5))
        f2, t2 = match.random_matching(n, m, np.random.default_rng(5))
        assert (f1 == f2).all() and (t1 == t2).all()
        assert len(set(f1)) == len(f1) == min(n, m) and len(set(t1)) == len(t1)
    seen = {tuple(match.random_matching(4, 4, np.random.default_rng(s))[0]) for s in range(200)}
    assert len(seen) > 20  # many of the 24 permutations occur


def reference_costs(model, prompt_ids, tags, trace_ids, k):
    """Eq. 4 by a loop of plain forward passes, one (tag, trace) pair at a time."""
    cost = torch.zeros(len(tags), len(trace_ids))
    for i, f in enumerate(tags):
        for j, t in enumerate(trace_ids):
            ids = torch.tensor([prompt_ids + f + t[:k]])
            with torch.no_grad():
                logp = model(ids).logits[0].float().log_softmax(-1)
            start = len(prompt_ids) + len(f)  # first trace token
            nll = [-logp[p - 1, ids[0, p]] for p in range(start, ids.shape[1])]
            cost[i, j] = torch.stack(nll).mean()
    return cost


@pytest.mark.parametrize("style", ["special", "text"])
def test_cost_matrix_equals_per_pair_forward_loop_for_any_chunking(tiny, style):
    """Single-token tags and multi-token text tags (their tokens are prompt: no cost, no loss)."""
    tok, model, fork_ids = tiny
    tags = [[i] for i in fork_ids] if style == "special" else data.fork_ids(tok, 4, "text")
    q = {"prompt": "Add 12+23+14.", "traces": [toy.solve([12, 23, 14], s) for s in toy.STYLES]}
    enc = data.encode_question(tok, q, max_len=256)
    for k in (1000, 5):  # all trace tokens, and only the first K
        ref = reference_costs(model, enc["prompt_ids"], tags, enc["trace_ids"], k)
        for batch, ce_chunk in [(16, 1024), (3, 7), (1, 1)]:
            nll = match.SequenceNLL(model, ce_chunk=ce_chunk)
            got = match.cost_matrix(nll, enc["prompt_ids"], tags, enc["trace_ids"], k, batch, tok.pad_token_id)
            assert got.shape == (4, 4)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref.std() > 0.01  # rows differ: the test would notice swapped forks


@pytest.mark.parametrize("mode, layout", [("hungarian", "batch"), ("random", "batch"), ("hungarian", "concat")])
def test_match_questions_equals_cost_matrix_and_assignment_per_question(tiny, mode, layout):
    """The batched matching pass (all questions' sequences in one queue, any batch size, PAD
    forwards beyond what is needed; in the concat layout each prompt once, its N x M branches under
    the tree mask) gives, per question, the reference cost matrix's matching."""
    tok, model, fork_ids = tiny
    tags, nll = [[i] for i in fork_ids], match.SequenceNLL(model)
    questions = toy.make_questions(5, seed=2)
    questions[1]["traces"] = questions[1]["traces"][:1]  # M = 1
    questions[3]["traces"] = questions[3]["traces"] + questions[0]["traces"][:2]  # M = 6 > N = 4
    encoded = [data.encode_question(tok, q, 256) for q in questions]
    for batch, k, forwards in [(7, 1000, None), (64, 6, 9)]:
        got = match.match_questions(nll, encoded, tags, mode, k, batch, tok.pad_token_id, "cpu",
                                    [np.random.default_rng(q) for q in range(5)], forwards, layout)
        for q, (enc, m) in enumerate(zip(encoded, got)):
            cost = match.cost_matrix(nll, enc["prompt_ids"], tags, enc["trace_ids"], k, 3, tok.pad_token_id).numpy()
            optimal = match.hungarian(cost)
            assert [m.optimal_forks, m.optimal_traces] == [optimal[0].tolist(), optimal[1].tolist()]
            assert math.isclose(m.gap, match.matching_gap(cost, *optimal), rel_tol=1e-4, abs_tol=1e-6)
            pairs = match.random_matching(4, len(enc["trace_ids"]), np.random.default_rng(q)) \
                if mode == "random" else optimal
            assert [m.forks, m.traces] == [pairs[0].tolist(), pairs[1].tolist()]
            assert len(m.forks) == min(4, len(enc["trace_ids"]))


def test_prompt_and_fork_carry_no_loss_and_cost_is_length_normalised(tiny):
    tok, model, fork_ids = tiny
    prompt_ids, trace = [5, 6, 7, 8], [20, 21, 22, 23, 24, 25]
    ids, labels = data.make_sequence(prompt_ids, [fork_ids[0]], trace)
    assert labels[:5] == [batching.IGNORE] * 5 and labels[5:] == trace and ids[4] == fork_ids[0]
    ids, labels = data.make_sequence(prompt_ids, [90, 91, 92], trace)  # a text tag: all its tokens are prompt
    assert labels[:7] == [batching.IGNORE] * 7 and labels[7:] == trace and ids[4:7] == [90, 91, 92]
    nll = match.SequenceNLL(model)
    for k in (2, 6, 100):
        torch.set_grad_enabled(False)
        seq = data.make_sequence(prompt_ids, [fork_ids[0]], trace, k)
        total, count = nll(*batching.collate([seq], tok.pad_token_id)[:2])
        assert int(count) == min(k, len(trace))  # only trace tokens are counted
        cost = match.cost_matrix(nll, prompt_ids, [fork_ids[:1]], [trace], k, 4, tok.pad_token_id)
        assert math.isclose(float(cost), float(total) / min(k, len(trace)), rel_tol=1e-6)
    torch.set_grad_enabled(True)


def test_sequence_nll_equals_hugging_face_loss(tiny):
    """The chunked cross-entropy (never [tokens, vocab] logits for the whole batch) is the plain loss."""
    tok, model, fork_ids = tiny
    seqs = [data.make_sequence([3, 4, 5], [fork_ids[i % 4]], list(range(30, 30 + 5 + 3 * i))) for i in range(4)]
    input_ids, labels, mask = batching.collate(seqs, tok.pad_token_id)
    total, count = match.SequenceNLL(model, ce_chunk=5)(input_ids, labels, mask)
    reference = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(total.sum() / count.sum(), reference, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- data.py

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
        assert all(score.grade(t, q["answer"])[1] for t in q["traces"])
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


def test_bad_input_stops_before_training_and_leaves_out_dir_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("earlier results\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "traces": ["a"]}\n{oops\n')
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "Add " + "1 + " * 50 + "1.", "traces": ["x"]}) + "\n")
    cases = [(["--data", str(bad)], "bad.jsonl:2: malformed JSON"),
             (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: cannot read"),
             (["--model", str(tmp_path / "no_such_model")], "--model " + str(tmp_path / "no_such_model")),
             (["--data", str(long_prompt), "--max_len", "20"], "long.jsonl:1: a prompt of"),
             (["--matching", "greedy"], "--matching must be hungarian, random or sft"),
             (["--num_forks", "0"], "--num_forks must be from 1 to"),
             (["--match_tokens", "0"], "--match_tokens must be >= 1"),
             (["--max_len", "1"], "--max_len must be >= 2"),
             (["--layout", "tree"], "--layout must be batch or concat"),
             (["--grad_clip", "-1"], "--grad_clip must be > 0"),
             (["--warmup", "1"], "--warmup must be in [0, 1)"),
             (["--weight_decay", "-0.1"], "--weight_decay must be >= 0"),
             (["--num_forks", "100000"], f"--num_forks must be from 1 to {train.MAX_FORKS}"),
             (["--lr", "nan"], "--lr: expected a finite number, got 'nan'"),
             (["--lr", "inf"], "--lr: expected a finite number, got 'inf'"),
             (["--toy_questions", "0"], "--toy_questions must be >= 1")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as stop:
            train.main(train.parse_config(["--out_dir", str(out), *flags]))
        said = str(stop.value.code) + capsys.readouterr().err
        assert stop.value.code != 0 and message in said, said
    assert sorted(os.listdir(out)) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == "earlier results\n"


def test_unusable_out_dir_or_data_path_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_model", lambda *a: pytest.fail("loaded a model"))
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # a reader of a FIFO with no writer blocks forever
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("{oops")
    cases = [(["--out_dir", str(a_file)], f"{a_file}: exists and is not a directory"),
             (["--out_dir", "/proc/ssft-out"], "/proc/ssft-out: cannot write there"),
             (["--out_dir", str(tmp_path / "ok"), "--data", str(fifo)], f"{fifo}: not a regular file"),
             (["--out_dir", str(tmp_path / "garbage")], "garbage/config.json: not valid JSON")]
    for flags, message in cases:
        with pytest.raises(SystemExit) as stop:
            train.main(train.parse_config(flags))
        assert stop.value.code != 0 and message in str(stop.value.code), stop.value.code
    assert a_file.read_text() == "mine"


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


def test_micro_batches_pad_every_rank_to_the_same_number_of_forwards():
    seqs = [([1] * n, [batching.IGNORE] + [1] * (n - 1)) for n in (3, 9, 4, 8, 5)]
    batches, order = batching.micro_batches(seqs, micro_batch=2, num_batches=5, pad=batching.pad_item(0))
    assert len(batches) == 5 and [len(b) for b in batches] == [2, 2, 1, 1, 1]
    assert [len(s[0]) for b in batches[:3] for s in b] == [9, 8, 5, 4, 3]  # similar lengths share a batch
    assert [seqs[i] for i in order] == [s for b in batches[:3] for s in b]
    _, labels, _ = batching.collate(batches[-1], pad_id=0)
    assert labels.shape == (1, 1) and (labels == batching.IGNORE).all()  # PAD: one token, no loss
    ranks = batching.balance([1, 8, 4, 4, 2, 1], 2)
    assert sorted(sum(ranks, [])) == list(range(6))
    loads = [sum([1, 8, 4, 4, 2, 1][i] for i in r) for r in ranks]
    assert max(loads) - min(loads) <= 8


# ----------------------------------------------------------------------------- train.py

def make_cfg(**kw):
    return train.parse_config([f"--{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("mode", ["hungarian", "random", "sft"])
def test_one_step_trains_exactly_the_documented_pairs(world_of_one, mode):
    """The gradient of train.py's step equals the gradient of Eq. 5 over the pairs documented for
    the mode, computed here with a plain forward of an unsharded copy of the same weights."""
    cfg = make_cfg(matching=mode, toy_questions=6, micro_batch=3, match_batch=5)
    tok, fork_ids, num_trained = train.load_tokenizer(cfg)
    model, _ = train.load_model(cfg, tok, fork_ids, num_trained, 0, torch.device("cpu"))
    questions = toy.make_questions(cfg.toy_questions, cfg.seed)
    questions[1]["traces"] = questions[1]["traces"][:2]  # M varies: 4, 2, 4, ...
    encoded = [data.encode_question(tok, q, cfg.max_len) for q in questions]
    mine = [encoded[q] for q in (0, 1, 2)]
    rngs = [np.random.default_rng([cfg.seed, 3, q]) for q in (0, 1, 2)]
    matched = match.match_questions(model, mine, fork_ids, mode, cfg.match_tokens, cfg.match_batch, tok.pad_token_id,
                                    torch.device("cpu"), rngs)
    plain = toy.make_model(tok)
    plain.config.vocab_size = model.lm.config.vocab_size
    full = {k[3:]: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
    plain.load_state_dict(full)
    reference = match.SequenceNLL(plain)
    for q, enc, m in zip((0, 1, 2), mine, matched):
        if mode == "hungarian":
            cost = match.cost_matrix(reference, enc["prompt_ids"], fork_ids, enc["trace_ids"],
                                     cfg.match_tokens, 64, tok.pad_token_id)
            expected = match.hungarian(cost.numpy())
        elif mode == "random":
            expected = match.random_matching(4, len(enc["trace_ids"]), np.random.default_rng([cfg.seed, 3, q]))
        else:
            expected = (np.zeros(len(enc["trace_ids"]), dtype=int), np.arange(len(enc["trace_ids"])))
        assert [m.forks, m.traces] == [list(map(int, a)) for a in expected]
    seqs = [data.make_sequence(enc["prompt_ids"], fork_ids[f], enc["trace_ids"][j])
            for enc, m in zip(mine, matched) for f, j in zip(m.forks, m.traces)]
    assert train.training_rows(mine, matched, fork_ids, "batch") == seqs
    loss, tokens, _, _ = train.training_pass(model, seqs, cfg.micro_batch, "batch", tok.pad_token_id, torch.device("cpu"))
    total, count = reference(*batching.collate(seqs, tok.pad_token_id))
    (total.sum() / count.sum()).backward()
    assert tokens == count.sum() and math.isclose(loss, (total.sum() / count.sum()).item(), rel_tol=1e-5)
    grads = {k[3:]: p.grad.full_tensor() for k, p in model.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)


def test_epoch_batches_pack_whole_questions_up_to_batch_size():
    """Algorithm 2's queue over steps: questions in the epoch's seeded order, whole, until the step
    holds batch_size sequences; every question trains exactly once per epoch."""
    assert len(train.schedule([4] * 10, 8, seed=0, epochs=1)) == 5  # 40 sequences / 8
    assert len(train.schedule([4] * 1000, 32, seed=0, epochs=6)) == 750  # the paper's s1k-4mixed run: ~756
    rng = np.random.default_rng(0)
    for batch_size in (1, 3, 8, 13):
        sizes = rng.integers(1, 5, 57).tolist() + [20]  # 1 to 4 traces, and one question larger than any step
        for epoch in range(3):
            steps = train.epoch_batches(sizes, batch_size, seed=5, epoch=epoch)
            assert sorted(q for s in steps for q in s) == list(range(len(sizes)))  # each question once
            for s, following in zip(steps, steps[1:] + [None]):
                held = sum(sizes[q] for q in s)
                assert held <= batch_size or len(s) == 1  # over only as a question alone
                if following:  # full: the next question would not have fitted
                    assert held + sizes[following[0]] > batch_size
            order = [q for s in steps for q in s]
            assert order == np.random.default_rng([5, epoch]).permutation(len(sizes)).tolist()


def test_hungarian_random_and_sft_take_the_same_steps(tmp_path, run):
    """10 questions x 4 traces, --batch_size 8: 5 optimiser steps of 2 questions in every mode."""
    path = tmp_path / "ten.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in toy.make_questions(10, seed=4)))
    for mode in ("hungarian", "random", "sft"):
        out = run([sys.executable, "train.py", "--data", str(path), "--batch_size", "8", "--epochs", "1",
                   "--matching", mode, "--out_dir", str(tmp_path / mode)])
        assert out.returncode == 0, out.stderr
        assert "steps 0..5 of 5 (5 per epoch of <= 8 sequences)" in out.stdout, out.stdout
        records = [json.loads(line) for line in open(tmp_path / mode / "metrics.jsonl")]
        assert [(r["questions"], r["sequences"]) for r in records] == [(2, 8)] * 5


def write_varied_data(path):
    """Questions with 1, 3, 8, 4 and 2 traces (more than the 4 forking tokens in one)."""
    rng = np.random.default_rng(0)
    rows = []
    for m in [1, 3, 8, 4, 2, 4]:
        nums = [int(x) for x in rng.integers(10, 99, 3)]
        rows.append({"prompt": "Add {} + {} + {}.".format(*nums),
                     "traces": [toy.solve(nums, toy.STYLES[j % 4]) + " ok" * j for j in range(m)]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_fsdp_on_two_processes_matches_one_process(tmp_path, run):
    """Same losses and final weights; the ranks hold questions with different numbers of traces,
    and a micro-batch of PAD sequences occurs (a hang fails the test through its timeout)."""
    path = tmp_path / "varied.jsonl"
    write_varied_data(path)
    flags = ["--data", str(path), "--layout", "batch", "--batch_size", "10", "--micro_batch", "3", "--match_batch", "7",
             "--epochs", "2", "--max_len", "60"]
    one = run([sys.executable, "train.py", "--out_dir", str(tmp_path / "one"), *flags])
    assert one.returncode == 0, one.stderr
    two = run([*TORCHRUN, "--nproc_per_node", "2", "--master_port", "29533", "train.py",
               "--out_dir", str(tmp_path / "two"), *flags])
    assert two.returncode == 0, two.stderr
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 6  # steps of 1 to 4 questions, one rank idle in some
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k].float(), w1[k].float(), rtol=1e-2, atol=1e-3)
    m1, m2 = (json.load(open(tmp_path / d / "matching.json")) for d in ("one", "two"))
    for e1, e2 in zip(m1["epochs"], m2["epochs"]):  # same configurations; gaps equal up to float noise
        for key in ("mean_gap", "gap_sum"):
            assert math.isclose(e1.pop(key), e2.pop(key), rel_tol=1e-4)
    assert m1 == m2


FAULT = """
import os, signal, sys
import match, train
from plumbing import fsdp
kind, when = sys.argv[1], int(sys.argv[2])
calls = []

def after(n):  # True on the n-th call
    calls.append(1)
    return len(calls) == n

if kind == "kill_in_step":  # SIGKILL itself at the start of the training pass of step `when`
    real_pass = train.training_pass
    def training_pass(*args, **kwargs):
        if after(when + 1):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_pass(*args, **kwargs)
    train.training_pass = training_pass
elif kind == "kill_in_checkpoint":  # SIGKILL after the `when`-th checkpoint's shards, before its rename
    real_save = fsdp.dcp.save
    def save(*args, **kwargs):
        real_save(*args, **kwargs)
        if after(when):
            os.kill(os.getpid(), signal.SIGKILL)
    fsdp.dcp.save = save
elif kind == "nan_in_step":  # the loss of step `when` becomes NaN (and so do its gradients)
    real_forward = match.SequenceNLL.forward
    def forward(self, *args, **kwargs):
        nll, n = real_forward(self, *args, **kwargs)
        if self.training and train_steps() == when:
            nll = nll * float("nan")
        return nll, n
    def train_steps():
        return sum(1 for line in open(os.path.join(cfg.out_dir, "metrics.jsonl")))
    match.SequenceNLL.forward = forward
cfg = train.parse_config(sys.argv[3:])
train.main(cfg)
"""


def faulty(run, kind, when, flags):
    return run([sys.executable, "-c", FAULT, kind, str(when), *flags])


RUN_FLAGS = ["--toy_questions", "32", "--batch_size", "32", "--epochs", "1", "--save_every", "2"]  # 4 steps


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 4-step toy run with checkpoints at steps 2 and 4: (its directory, its losses)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    done = subprocess.run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS], cwd=HERE,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(losses(out)) == 4
    return out, losses(out)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def snapshot(path):
    """{relative path: (size, mtime)} of every file under `path`."""
    return {os.path.relpath(os.path.join(d, f), path): (os.path.getsize(os.path.join(d, f)),
                                                         os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(path) for f in files}


def test_killed_runs_resume_from_the_last_complete_checkpoint_with_the_same_losses(tmp_path, run, finished):
    """kill -9 in the middle of the run (at half its steps) or during a checkpoint write: the same
    command again continues exactly as the uninterrupted run (same data order, RNG and schedule),
    and the dead run's lock file does not block it."""
    full, expected = finished
    killed_step = faulty(run, "kill_in_step", 2, ["--out_dir", str(tmp_path / "step"), *RUN_FLAGS])  # at half the steps
    assert killed_step.returncode == -9
    killed_ckpt = faulty(run, "kill_in_checkpoint", 2, ["--out_dir", str(tmp_path / "ckpt"), *RUN_FLAGS])
    assert killed_ckpt.returncode == -9
    assert os.path.isdir(tmp_path / "ckpt" / "checkpoints" / "step_000004.tmp")  # half-written, not taken
    for name in ("step", "ckpt"):
        assert "pid" in (tmp_path / name / "lock").read_text()  # the dead run's lock file is still there
        rest = run([sys.executable, "train.py", "--out_dir", str(tmp_path / name), *RUN_FLAGS])
        assert rest.returncode == 0, rest.stderr
        assert "resumed from" in rest.stdout and "step_000002" in rest.stdout, rest.stdout
        assert losses(tmp_path / name) == expected, name
        assert json.load(open(tmp_path / name / "matching.json")) == json.load(open(full / "matching.json"))

    changed = run([sys.executable, "train.py", "--out_dir", str(tmp_path / "step"), *RUN_FLAGS, "--lr", "0.1"])
    assert changed.returncode != 0 and "other settings (lr)" in changed.stderr

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(full / "final")
    model = AutoModelForCausalLM.from_pretrained(full / "final")
    assert model.dtype == torch.bfloat16
    assert tok.convert_tokens_to_ids(data.fork_tokens(4)) == list(range(len(tok) - 4, len(tok)))
    prompt = tok(data.build_text(tok, "Add 10 + 20 + 30.", "<think1>"), return_tensors="pt",
                 add_special_tokens=False)
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def wait_for_steps(out_dir, n, proc, timeout=120):
    """Waits until `proc` has logged n steps in out_dir/metrics.jsonl."""
    path, t0 = os.path.join(out_dir, "metrics.jsonl"), time.time()
    while not (os.path.exists(path) and len(open(path).read().splitlines()) >= n):
        assert proc.poll() is None and time.time() - t0 < timeout, proc.communicate()
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_after_the_step_and_the_same_command_resumes_with_the_same_losses(
        tmp_path, run, finished, signum):
    """What a scheduler sends before preempting (SIGTERM), or Ctrl-C: the step ends, a checkpoint is
    written and named, the exit code is non-zero; rerunning gives the uninterrupted losses."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(out, 1, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    step = len(losses(out))
    assert step < 4 and f"checkpoint {out}/checkpoints/step_{step:06d}" in stdout, stdout
    rest = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS])
    assert rest.returncode == 0 and f"step_{step:06d} at step {step}" in rest.stdout, rest.stderr
    assert losses(out) == finished[1]


def test_a_second_run_on_a_busy_out_dir_stops_at_once_naming_the_running_process(tmp_path, run):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", "--out_dir", str(out), "--epochs", "50"], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_steps(out, 1, first)
        t0 = time.time()
        second = run([sys.executable, "train.py", "--out_dir", str(out), "--epochs", "50"], timeout=60)
        assert second.returncode != 0 and time.time() - t0 < 30
        assert f"{out} is in use by a running job (pid {first.pid}" in second.stderr, second.stderr
        assert len(losses(out)) >= 1  # the first run's log is its own: nothing was cut or doubled
    finally:
        first.kill()
        first.wait()


def test_a_finished_run_is_never_rolled_back_and_a_rerun_writes_nothing(tmp_path, run, finished):
    out = copy_run(finished[0], tmp_path / "run")
    before = snapshot(out)
    fewer = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS, "--max_steps", "2"])
    assert fewer.returncode != 0 and "checkpoint at step 4, past --max_steps 2" in fewer.stderr, fewer.stderr
    again = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS])
    assert again.returncode == 0 and "complete at step 4" in again.stdout, again.stderr
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "lock"} == {k: v for k, v in before.items() if k != "lock"}


def test_a_checkpoint_that_fails_to_load_is_set_aside_and_the_previous_one_used(tmp_path, run, finished):
    out = copy_run(finished[0], tmp_path / "run")
    shutil.rmtree(out / "final")  # not complete: it must resume
    shard = next((out / "checkpoints" / "step_000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated, as by a full disk
    rest = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS])
    assert rest.returncode == 0, rest.stderr
    assert "checkpoints/step_000004 does not load" in rest.stdout and "step_000002 at step 2" in rest.stdout
    assert (out / "checkpoints" / "step_000004.corrupt").is_dir()  # set aside, not deleted
    assert losses(out) == finished[1]
    # none left: a clear error, not a run from the half-loaded weights
    out = copy_run(finished[0], tmp_path / "none")
    shutil.rmtree(out / "final")
    for state in (out / "checkpoints").glob("*/trainer_state.json"):
        state.unlink()
    rest = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS])
    assert rest.returncode != 0 and "error: " + str(out) + ": no checkpoint loads" in rest.stderr, rest.stderr


def test_garbage_files_in_out_dir_are_named_or_rebuilt_exactly(tmp_path, run, finished):
    out = copy_run(finished[0], tmp_path / "run")
    (out / "matching.json").write_text("{garbage")
    rest = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS])
    assert rest.returncode == 0, rest.stderr  # rebuilt from the checkpoint's statistics
    assert json.load(open(out / "matching.json")) == json.load(open(finished[0] / "matching.json"))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{cut", *lines[2:]]) + "\n")
    rest = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS])
    assert rest.returncode != 0 and "metrics.jsonl:2: malformed JSON" in rest.stderr, rest.stderr
    (out / "config.json").write_text("not json")
    rest = run([sys.executable, "train.py", "--out_dir", str(out), *RUN_FLAGS])
    assert rest.returncode != 0 and "config.json: not valid JSON" in rest.stderr, rest.stderr


def test_non_finite_loss_stops_with_the_step_or_is_skipped_and_counted(tmp_path, run):
    flags = ["--toy_questions", "24", "--batch_size", "32", "--epochs", "1"]
    stopped = faulty(run, "nan_in_step", 1, ["--out_dir", str(tmp_path / "stop"), *flags])
    assert stopped.returncode != 0 and "error: step 1: non-finite loss" in stopped.stderr, stopped.stderr
    assert "--skip_nonfinite" in stopped.stderr
    skipped = faulty(run, "nan_in_step", 1, ["--out_dir", str(tmp_path / "skip"), *flags, "--skip_nonfinite", "true"])
    assert skipped.returncode == 0, skipped.stderr
    with open(tmp_path / "skip" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["skipped"] for r in records] == [0, 1, 1]
    weights = load_file(tmp_path / "skip" / "final" / "model.safetensors")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())


def test_diverged_weights_stop_at_the_cost_matrix_or_are_skipped_with_a_strict_json_log(tmp_path, run):
    """--lr 1e30 makes the weights non-finite after one step: the run stops at the next matching
    pass naming the step and its questions (not inside linear_sum_assignment), or skips."""
    flags = ["--toy_questions", "16", "--batch_size", "32", "--epochs", "2", "--lr", "1e30"]
    stopped = run([sys.executable, "train.py", "--out_dir", str(tmp_path / "stop"), *flags])
    assert stopped.returncode != 0 and "error: step 1: non-finite matching costs for questions [" in stopped.stderr
    assert "Traceback" not in stopped.stderr, stopped.stderr
    skipped = run([sys.executable, "train.py", "--out_dir", str(tmp_path / "skip"), *flags, "--skip_nonfinite"])
    assert skipped.returncode == 0, skipped.stderr

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    records = [json.loads(line, parse_constant=no_constants) for line in open(tmp_path / "skip" / "metrics.jsonl")]
    assert [r["skipped"] for r in records] == [0, 1, 2, 3] and records[1]["loss"] is None


def test_sft_logs_no_matching_gap_and_logs_never_hold_nan(tmp_path):
    stats = matchstats.MatchingStats("sft", data.fork_tokens(2))
    stats.update(0, [0, 0], [0, 1], None, None)
    assert stats.to_json()["epochs"][0]["mean_gap"] is None  # undefined without costs, not 0.0
    files.append_jsonl(str(tmp_path / "log.jsonl"), {"lr": float("inf"), "loss": float("nan"), "x": [1.0]})
    assert (tmp_path / "log.jsonl").read_text() == '{"lr": null, "loss": null, "x": [1.0]}\n'


# ----------------------------------------------------------------------------- concat layout (A.5)

def test_tree_mask_matches_its_definition():
    rows = [concat.make_branches([1, 2, 3], [([7], [4, 5]), ([8], [6]), ([9], [4, 4, 4])]),
            concat.make_branches([1], [([7], [5])]), batching.pad_item(0, "concat")]
    _, _, position_ids, branch_ids = concat.collate_branches(rows, pad_id=0)
    mask = concat.tree_mask(branch_ids)
    for b in range(len(rows)):
        for q in range(branch_ids.shape[1]):
            for k in range(branch_ids.shape[1]):
                bq, bk = int(branch_ids[b, q]), int(branch_ids[b, k])
                if bq == -1:
                    allowed = k <= q and bk == -1  # padding sees earlier padding only
                else:
                    allowed = k <= q and (bk == 0 or bk == bq)  # the prompt or its own branch
                assert bool(mask[b, 0, q, k]) == allowed
    assert position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 3, 4, 5, 6]  # branches restart after the prompt


def test_concat_branches_are_isolated(tiny):
    tok, model, fork_ids = tiny
    prompt = [5, 6, 7, 8]
    a = [([fork_ids[0]], [20, 21, 22]), ([fork_ids[1]], [30, 31, 32, 33]), ([fork_ids[2]], [40, 41])]
    b = [a[0], ([fork_ids[1]], [90, 91, 92, 93]), a[2]]  # branch 2 changed
    logits = []
    for branches in (a, b):
        input_ids, _, position_ids, branch_ids = concat.collate_branches([concat.make_branches(prompt, branches)], 0)
        with torch.no_grad():
            logits.append(model(input_ids=input_ids, attention_mask=concat.tree_mask(branch_ids),
                                position_ids=position_ids).logits[0])
    other = (branch_ids[0] != 2)
    torch.testing.assert_close(logits[0][other], logits[1][other], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0][~other], logits[1][~other])
    alone = torch.tensor([prompt + [fork_ids[2], 40, 41]])  # a branch equals the sequence it stands for
    with torch.no_grad():
        torch.testing.assert_close(model(alone).logits[0, 4:], logits[0][branch_ids[0] >= 0][-3:], rtol=1e-5, atol=1e-5)


def test_flex_attention_block_mask_equals_dense_mask_forward(sdpa_and_flex_models):
    """FlexAttention (the CUDA path) against SDPA with the dense mask, forward on the CPU (the
    backward on CUDA is in test_gpu.py)."""
    sdpa, flex = sdpa_and_flex_models(32, "cpu")
    rows = [concat.make_branches([1, 2, 3], [([7], list(range(20, 40))), ([8, 9], list(range(50, 61)))]),
            concat.make_branches([1, 2], [([9], [4, 5, 6])])]
    input_ids, _, position_ids, branch_ids = concat.collate_branches(rows, pad_id=0)
    with torch.no_grad():
        dense = sdpa(input_ids=input_ids, attention_mask=concat.tree_mask(branch_ids), position_ids=position_ids).logits
        block = flex(input_ids=input_ids, attention_mask=concat.tree_block_mask(branch_ids),
                     position_ids=position_ids).logits
    real = branch_ids >= 0
    torch.testing.assert_close(block[real], dense[real], rtol=1e-5, atol=1e-5)


def test_concat_layout_loss_and_gradients_equal_batch_layout(world_of_one):
    cfg = make_cfg(toy_questions=4, micro_batch=2, match_batch=8, max_len=40)
    tok, fork_ids, num_trained = train.load_tokenizer(cfg)
    model, _ = train.load_model(cfg, tok, fork_ids, num_trained, 0, torch.device("cpu"))
    questions = toy.make_questions(4, seed=1)
    questions[0]["traces"] = questions[0]["traces"][:1]
    questions[1]["traces"] = questions[1]["traces"][:3]
    questions[2]["traces"][0] += " and some more words to cut" * 5  # truncated at --max_len
    encoded = [data.encode_question(tok, q, cfg.max_len) for q in questions]
    assert sum(e["truncated"] for e in encoded) >= 1
    rngs = [np.random.default_rng(q) for q in range(4)]
    matched = match.match_questions(model, encoded, fork_ids, cfg.matching, cfg.match_tokens, cfg.match_batch,
                                    tok.pad_token_id, torch.device("cpu"), rngs)
    results = []
    for layout in ("batch", "concat"):
        rows = train.training_rows(encoded, matched, fork_ids, layout)
        loss, tokens, _, _ = train.training_pass(model, rows, cfg.micro_batch, layout, tok.pad_token_id,
                                                 torch.device("cpu"))
        results.append((loss, tokens, {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (loss_b, tokens_b, grads_b), (loss_c, tokens_c, grads_c) = results
    assert tokens_b == tokens_c and math.isclose(loss_c, loss_b, rel_tol=1e-5)
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7)


def test_concat_and_batch_commands_log_the_same_first_loss(tmp_path, run):
    first = []
    for layout in ("batch", "concat"):
        result = run([sys.executable, "train.py", "--layout", layout, "--max_steps", "2", "--toy_questions", "32",
                      "--out_dir", str(tmp_path / layout)])
        assert result.returncode == 0 and f"{layout} layout" in result.stdout, result.stderr
        first.append(losses(tmp_path / layout)[0])
    assert math.isclose(first[0], first[1], rel_tol=1e-5)


def test_a_text_style_run_adds_no_token_and_its_final_model_says_how_it_was_prompted(tmp_path, run):
    out = tmp_path / "text"
    done = run([sys.executable, "train.py", "--fork_style", "text", "--toy_questions", "32", "--max_steps", "2",
                "--out_dir", str(out)])
    assert done.returncode == 0, done.stderr
    assert "forking tags '<|im_start|><think1>\\n'..'<|im_start|><think4>\\n'" in done.stdout, done.stdout
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert data.count_fork_tokens(tok) == 0 and len(tok) == len(toy.make_tokenizer())
    assert json.load(open(out / "final" / "ssft.json")) == {"fork_style": "text", "num_forks": 4}
    assert json.load(open(out / "matching.json"))["fork_style"] == "text"


# ----------------------------------------------------------------------------- toy.py: the mechanism (Section 3.3)

def test_recognise_finds_the_style_of_every_trace_and_its_answer():
    for q in toy.make_questions(50, seed=7):
        for style, trace in zip(q["sources"], q["traces"]):
            assert toy.recognise(trace) == style
            assert grader.last_boxed(trace) == q["answer"]


@pytest.mark.parametrize("text", [
    "Left to left: 12+34=46, 46+56=102. The answer is \\boxed{102}.",  # a blend of two styles
    "Left to right: 12+34=46, 46+56=102.",  # no answer
    "By place value: ones 2+4+6=12. The answer is \\boxed{102}.",  # a step missing
    "The answer is \\boxed{102}.", ""])
def test_recognise_calls_broken_traces_other(text):
    assert toy.recognise(text) == "other"


def test_run_metrics_on_a_hand_made_run(tmp_path):
    """purity, distinct styles, Pass@1 of the Eq. 6 token and cons@k in turn over the tokens, from
    the files a run leaves: eval.jsonl (infer.py's rows), select_token.json, metrics and matching."""
    left, place, direct = (toy.solve([10, 11, 12], s) for s in ("left", "place", "direct"))
    wrong = direct.replace("{33}", "{34}")
    forks = ["<think1>", "<think2>"] * 2
    rows = [{"id": 0, "gold": "33", "completions": [{"fork": f, "text": t, "tokens": 5}
                                                    for f, t in zip(forks, [left, place, left, wrong])]},
            {"id": 1, "gold": "33", "completions": [{"fork": f, "text": t, "tokens": 5}
                                                    for f, t in zip(forks, [wrong, wrong, direct, "garbage"])]}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0, "gap": 0.5}) + "\n")
    configurations = [{"edges": [[1, "left"], [0, "place"]], "count": 3}, {"edges": [[1, "place"]], "count": 2}]
    (tmp_path / "matching.json").write_text(json.dumps({"fork_tokens": forks[:2], "epochs": [
        {"epoch": 0, "configurations": configurations}]}))  # Eq. 6: <think2> reaches 2 sources, <think1> 1
    select_token.main(select_token.parse_config(["--out_dir", str(tmp_path)]))  # as the run does: select_token.json
    m = toy_compare.run_metrics("hungarian", str(tmp_path), max_k=4)
    # <think1>: left, left, direct, direct -> majority left (2 of 4); <think2>: place, direct, direct, other
    assert m["per_token"]["<think1>"]["majority"] == "left" and m["per_token"]["<think1>"]["purity"] == 0.5
    assert m["per_token"]["<think2>"]["majority"] == "direct" and m["per_token"]["<think2>"]["purity"] == 0.5
    assert m["distinct_styles"] == 2 and m["purity"] == 0.5
    assert m["pass@1"] == 4 / 8 and m["pass@1_selected"] == 1 / 4  # <think2> is right once: place
    # cons@1: one response of <think1>, the first token, in expectation: its accuracy (problem 0: 2 of 2, 1: 1 of 2);
    # cons@4, all four: problem 0: 33 wins; problem 1: 34 (two) beats 33
    assert m["cons@1"] == 0.75 and m["cons@4"] == 0.5
    assert m["selected"] == "<think2>" and m["configurations"] == [2] and m["gap"] == [0.5]
    half = toy_compare.over_seeds([0.2, 0.4, 0.6])
    assert half["mean"] == pytest.approx(0.4) and half["ci95"] == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-3)


def test_every_figure_gives_one_colour_to_one_meaning():
    """Variants, styles and select_token.py's edge and curve colours never share a colour, and every
    variant and style toy_compare.py draws has its own."""
    tables = [toy_compare.VARIANT_COLOURS, toy_compare.STYLE_COLOURS, figures.COLOURS]
    colours = [c for table in tables for c in table.values()]
    assert len(colours) == len(set(colours)), tables
    assert set(toy_compare.Config.variants.split(",")) <= set(toy_compare.VARIANT_COLOURS)
    assert set(toy.STYLES + ["other"]) == set(toy_compare.STYLE_COLOURS)


def test_toy_compare_redraws_its_figure_from_a_saved_summary(tmp_path, run):
    """--plot_only draws toy_compare.png from summary.json alone, running nothing."""
    over = toy_compare.over_seeds
    styles = {s: 0.25 for s in toy.STYLES} | {"other": 0.0}
    runs = [{"per_token": {t: {"styles": styles} for t in ("<think1>", "<think2>")}, "configurations": [9, 7, 7],
             "gap": [None, 0.1, 0.3, 0.5]} for seed in (0, 1)]
    variant = {**{f"pass@{k}": over([0.3 * k, 0.3 * k + 0.1]) for k in (1, 2)},
               "per_token": {t: {"accuracy": over([0.4, 0.5]), "mean_tokens": over([20, 30])} for t in ("<think1>", "<think2>")},
               "runs": runs}
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"samples": 2},
                                                       "variants": {"hungarian": variant, "random": variant}}))
    done = run([sys.executable, "tools/toy_compare.py", "--plot_only", "--out_dir", str(tmp_path)], timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "toy_compare.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "runs").exists()
    done = run([sys.executable, "tools/toy_compare.py", "--plot_only", "--out_dir", str(tmp_path / "none")], timeout=60)
    assert done.returncode == 1 and "summary.json: cannot read" in done.stderr


def test_hungarian_tokens_specialise_and_answer_held_out_questions_well_above_chance(tmp_path):
    """toy_compare.py reduced to one seed of SSFT and 375 steps: train.py, select_token.py, infer.py
    and score.py end to end. Each forking token starts its own style, and the held-out accuracy is
    learned: chance, a uniform guess among the 58 possible sums, is 0.017."""
    cfg = toy_compare.Config(out_dir=str(tmp_path), variants="hungarian", seeds=1, epochs=3, eval_questions=50,
                             samples=8, jobs=1, gfpo=False)  # GFPO's own runs: test_gfpo.py
    summary = toy_compare.compare(cfg)["variants"]["hungarian"]
    run = summary["runs"][0]
    assert summary["distinct_styles"]["mean"] >= 3 and summary["purity"]["mean"] >= 0.85, run["per_token"]
    assert summary["pass@1"]["mean"] >= 0.1, run["per_token"]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "toy_compare.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missing_parquet_file_is_named_as_missing_not_as_unreadable(tmp_path):
    with pytest.raises(files.DataError, match="No such file"):
        datafiles.read_records(str(tmp_path / "s1K-1.1.parquet"))
