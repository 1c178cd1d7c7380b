"""Tests of bench.py: the --quick run CI covers and the parameter counts behind MFU.

    python -m pytest -q test_bench.py
"""
import json
import math
import os
import subprocess
import sys

import torch

import bench

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def test_quick_run_prints_and_saves_every_row_with_positive_finite_numbers(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "tools/bench.py", "--quick", "--out", str(out)], cwd=HERE,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    assert set(saved["summary"]) == {"train_speedup_vs_hf", "mfu_7b", "ssft_overhead_over_floor",
                                     "decode_speedup_vs_generate_6", "decode_speedup_vs_generate_32"}
    assert saved["summary"]["mfu_7b"] is None  # no 7B shape in --quick, and no MFU on the CPU
    assert all(v > 0 for k, v in saved["summary"].items() if k != "mfu_7b")
    assert saved["device"].startswith("cpu") and "bench.py --quick" in saved["command"]
    expected = [("train tok/s: train.py | HF", "tiny 128 tok"), ("train tok/s: train.py | HF", "tiny 256 tok"),
                ("ssft/sft step s: SSFT | SFT", "tiny N6 M4 K16 L64"),
                ("decode tok/s: infer | HF", "tiny 6 streams P32"), ("decode tok/s: infer | HF", "tiny 32 streams P32")]
    assert [(r["bench"], r["case"]) for r in rows] == expected
    for r in rows:
        for key in ("a", "b", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["case"], key, r[key])
        assert all(len(times) == 3 for times in r["times_s"])  # --quick: 3 timed runs, medians of them
        assert f"{r['bench']:<32}{r['case']:<30}" in run.stdout  # the printed table has the row
    assert "torch " + torch.__version__ in run.stdout  # the device and versions are printed


def test_shapes_have_the_published_qwen25_parameter_counts():
    """1.54B (1.31B non-embedding) and 7.61B (6.53B), as the model cards give them; the MFU's P is all
    but the input embedding."""
    for shape, total, non_embedding in (("1.5b", 1.54e9, 1.31e9), ("7b", 7.61e9, 6.53e9)):
        lm, params, matmul_params = bench.build_lm(shape, "meta", torch.float32, "sdpa")
        embedding = lm.get_input_embeddings().weight.numel()
        non_embedding_params = params - embedding * (2 if shape == "7b" else 1)
        assert abs(params - total) < 1e7 and abs(non_embedding_params - non_embedding) < 1e7
        assert matmul_params == params - embedding * (shape == "7b")  # 1.5B ties lm_head to the embedding


def test_bare_quick_flag_selects_the_tiny_cpu_defaults():
    assert bench.parse_config(["--quick"]).shapes == "tiny"
    cfg = bench.parse_config(["--quick", "--iters", "2"])
    assert (cfg.quick, cfg.iters, cfg.device) == (True, 2, "cpu")
    assert bench.parse_config(["--quick", "false"]).shapes == "1.5b,7b"


def test_the_bench_step_computes_train_py_s_gradients_with_its_defaults(tiny, world_of_one, monkeypatch):
    """bench.ssft_step times train.py's step without importing train.py: the same matching, the same
    loss (sum over trace tokens / their number) and so the same gradients as train.training_pass, and
    train.py's default learning rate, AdamW settings and clipping."""
    import copy
    import numpy as np
    import match
    import train
    tok, lm, fork_ids = tiny
    cfg = bench.parse_config(["--quick"])
    rng = np.random.default_rng(0)
    encoded = [bench.random_question(rng, 12, [9, 14, 6], len(tok), lm.config.vocab_size) for _ in range(2)]
    ids = [[i] for i in fork_ids]
    ours, theirs = match.SequenceNLL(copy.deepcopy(lm)), match.SequenceNLL(copy.deepcopy(lm))
    grads = {}
    ours.zero_grad = lambda set_to_none=True: None  # keep the gradients the step leaves
    assert (bench.LR, bench.BETAS, bench.WEIGHT_DECAY, bench.GRAD_CLIP) == (
        train.Config.lr, (0.9, 0.95), train.Config.weight_decay, train.Config.grad_clip)
    monkeypatch.setattr(bench, "GRAD_CLIP", 1e9)  # unclipped: a clipped gradient would hide a scale error
    bench.ssft_step(ours, None, encoded, ids, "hungarian", cfg, tok.pad_token_id, torch.device("cpu"))
    matched = match.match_questions(theirs, encoded, ids, "hungarian", cfg.match_tokens, cfg.match_batch,
                                    tok.pad_token_id, torch.device("cpu"), [np.random.default_rng([0, i]) for i in range(2)])
    rows = train.training_rows(encoded, matched, ids, "batch")
    train.training_pass(theirs, rows, train.Config.micro_batch, "batch", tok.pad_token_id, torch.device("cpu"))
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        grads[name] = (a.grad, b.grad)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert any(a is not None and a.abs().sum() > 0 for a, _ in grads.values())
    assert "betas=(0.9, 0.95)" in open(train.__file__).read()  # train.py's AdamW, as the bench builds it
