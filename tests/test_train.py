"""Tests of train.py: one step trains exactly the matched pairs (Eq. 5), the schedule, the three
matchings, bad input refused before anything loads, and two processes equal to one. CPU.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import match
import toy
import train
from plumbing import batching, files, matchstats

from conftest import HERE, TORCHRUN, losses


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
             (["--model", str(bad.with_suffix(".gguf"))], "is a GGUF file: make a folder of it once"),
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
    """10 questions x 4 traces, --batch_size 8: 5 optimiser steps of 2 questions in every mode; with 2
    forking tokens a matching trains 2 traces a question, so a step packs 4 questions (sft: still 2)."""
    path = tmp_path / "ten.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in toy.make_questions(10, seed=4)))
    for mode in ("hungarian", "random", "sft"):
        out = run([sys.executable, "train.py", "--data", str(path), "--batch_size", "8", "--epochs", "1",
                   "--matching", mode, "--out_dir", str(tmp_path / mode)])
        assert out.returncode == 0, out.stderr
        assert "steps 0..5 of 5 (5 per epoch of <= 8 sequences)" in out.stdout, out.stdout
        records = [json.loads(line) for line in open(tmp_path / mode / "metrics.jsonl")]
        assert [(r["questions"], r["sequences"]) for r in records] == [(2, 8)] * 5
    for mode, steps in (("hungarian", 3), ("sft", 5)):  # M = 4 > N = 2: a matching trains 2 a question
        out = run([sys.executable, "train.py", "--data", str(path), "--batch_size", "8", "--epochs", "1",
                   "--num_forks", "2", "--matching", mode, "--out_dir", str(tmp_path / f"{mode}_n2")])
        assert out.returncode == 0, out.stderr
        records = [json.loads(line) for line in open(tmp_path / f"{mode}_n2" / "metrics.jsonl")]
        assert [r["sequences"] for r in records] == ([8, 8, 4] if mode == "hungarian" else [8] * 5)


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
    flags = ["--data", str(path), "--layout", "batch", "--batch_size", "8", "--micro_batch", "3", "--match_batch", "7",
             "--epochs", "2", "--max_len", "60"]
    one = run([sys.executable, "train.py", "--out_dir", str(tmp_path / "one"), *flags])
    assert one.returncode == 0, one.stderr
    two = run([*TORCHRUN, "--nproc_per_node", "2", "--master_port", "29533", "train.py",
               "--out_dir", str(tmp_path / "two"), *flags])
    assert two.returncode == 0, two.stderr
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 6  # steps of 1 to 3 questions, one rank idle in some
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


def test_sft_logs_no_matching_gap_and_logs_never_hold_nan(tmp_path):
    stats = matchstats.MatchingStats("sft", data.fork_tokens(2))
    stats.update(0, [0, 0], [0, 1], None, None)
    assert stats.to_json()["epochs"][0]["mean_gap"] is None  # undefined without costs, not 0.0
    files.append_jsonl(str(tmp_path / "log.jsonl"), {"lr": float("inf"), "loss": float("nan"), "x": [1.0]})
    assert (tmp_path / "log.jsonl").read_text() == '{"lr": null, "loss": null, "x": [1.0]}\n'


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


TEARDOWN = """
import sys, torch, torch.distributed as dist
from plumbing import ranks
rank, world, device = ranks.init_distributed()
for step in range(20):  # the shapes of a training run's last collectives: objects, sums, a barrier
    parts = [None] * world
    dist.all_gather_object(parts, {"rank": rank, "step": step})
    assert ranks.all_sum([1.0], device) == [float(world)]
ranks.close_distributed()  # rank 0 finishes its last collective a moment before rank 1
print("clean", rank)
"""


def test_the_two_process_teardown_never_aborts_under_load(tmp_path):
    """Two gloo ranks that finish together, several times over while another process keeps the CPU busy:
    every run exits 0 and no rank aborts ("terminate called without an active exception"), which a
    rank tearing down its process group while the other still finished its last collective did."""
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 120: pass"])
    try:
        for k in range(4):
            done = subprocess.run([*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(29560 + k), "--no-python",
                                   sys.executable, "-c", TEARDOWN],
                                  cwd=HERE, capture_output=True, text=True, timeout=120)
            output = done.stdout + done.stderr
            assert done.returncode == 0 and "terminate called" not in output, output[-3000:]
            assert output.count("clean") == 2, output[-3000:]
    finally:
        burner.kill()


def test_report_to_tensorboard_logs_the_metrics_of_metrics_jsonl_and_the_log_line_gives_the_time_left(tmp_path, run):
    """--report_to tensorboard writes every number of each metrics.jsonl line as a scalar of that step;
    each step's line ends with the time the remaining steps will take at the run's pace."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    done = run([sys.executable, "train.py", "--out_dir", str(out), "--toy_questions", "32", "--max_steps", "3",
                "--report_to", "tensorboard"])
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 3 and all(re.search(r"\| \d+m\d\ds left$", line) for line in lines), lines
    assert lines[-1].endswith("| 0m00s left")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "lr", "grad_norm", "gap", "tokens_per_s", "pad_fraction"):
        logged = [(e.step, e.value) for e in events.Scalars(name)]
        assert logged == [(r["step"], pytest.approx(r[name], rel=1e-6)) for r in records], name
    refused = run([sys.executable, "train.py", "--out_dir", str(tmp_path / "other"), "--report_to", "wandb"])
    assert refused.returncode == 2 and "--report_to must be" in refused.stderr


def test_a_model_that_already_holds_forking_tokens_keeps_their_trained_rows(world_of_one, tmp_path):
    """Training from an SSFT model (its final/ holds <think1>..<think4>, trained) with N = 6: the
    two tags it adds start at the mean of the trained rows plus noise, and the four it holds keep
    their rows exactly (they are not re-initialised)."""
    tok = toy.make_tokenizer()
    held = [ids[0] for ids in data.fork_ids(tok, 4)]
    lm = toy.make_model(tok)
    trained_rows = torch.randn(4, lm.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        lm.get_input_embeddings().weight[held] = trained_rows
    lm.save_pretrained(tmp_path / "ssft")
    tok.save_pretrained(tmp_path / "ssft")
    cfg = make_cfg(model=tmp_path / "ssft", num_forks=6, activation_checkpointing="false")
    tok2, fork_ids, num_trained = train.load_tokenizer(cfg)
    assert [ids[0] for ids in fork_ids[:4]] == held and num_trained == len(tok)  # tok holds the 4
    model, _ = train.load_model(cfg, tok2, fork_ids, num_trained, 0, torch.device("cpu"))
    rows = model.lm.get_input_embeddings().weight.full_tensor().detach().float()
    assert torch.equal(rows[held], trained_rows), "the trained forking-token rows were overwritten"
    added = [ids[0] for ids in fork_ids[4:]]
    mean = rows[:num_trained].mean(0)
    assert not torch.equal(rows[added[0]], rows[added[1]])
    spread = rows[:num_trained].std()  # the added rows' noise is 1e-2 of it (data.init_fork_rows)
    assert all((rows[i] - mean).abs().max() < 0.1 * spread for i in added), \
        "the added tags did not start at the mean of the trained rows"
