"""The memory plan (plumbing/memory.py) held to train.py's real step, measured on fake tensors on the CPU
(plumbing/simulate.py): every phase within 10%, at two row lengths, in both layouts, with --cpu_offload
and without activation checkpointing. A change to sharding, recompute or the loss that the plan does
not follow fails here. Skipped, with the reason, where torch lacks the private modules the simulation
uses. All cases run in one subprocess (the simulation needs a process without a process group), about
a minute on 2 CPU cores.

    python -m pytest -q tests/test_simulate.py
"""
import json
import os
import subprocess
import sys

import pytest

import train
from plumbing import simulate

pytestmark = pytest.mark.skipif(bool(simulate.missing()),
                                reason=f"plumbing/simulate.py: {simulate.missing()}")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
# small enough to run in seconds, large enough that every term of the plan shows (3 layers: measured directly)
SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=False, model_type="qwen2",
             max_position_embeddings=8192)
FLAGS = ["--plan", "8x80", "--num_forks", "4", "--match_tokens", "128", "--match_batch", "16"]
CASES = {"batch 2048": ["--max_len", "2048"],
         "batch 4096": ["--max_len", "4096"],
         "concat 2048": ["--max_len", "2048", "--layout", "concat"],
         "concat 4096 offload": ["--max_len", "4096", "--layout", "concat", "--cpu_offload", "true"],
         "batch 2048 no checkpointing": ["--max_len", "2048", "--activation_checkpointing", "false"]}

SCRIPT = """
import contextlib, io, json, sys
import train
from plumbing import simulate
model, cases = sys.argv[1], json.loads(sys.argv[2])
for name, argv in cases.items():
    cfg = train.parse_config(["--model", model] + argv)
    plan = train.memory_plan(cfg, 8)
    build, step = train.simulated_step(cfg)
    layers = [3, 4, 5] if name == "batch 2048" else [3]
    runs = {n: simulate.measure(build, step, n, 8, cfg.cpu_offload) for n in layers}
    out = {"name": name, "plan": {p: gib - plan["context_gib"] for p, gib, _ in plan["phases"]},
           "sim": simulate.phase_peaks(simulate.line({3: runs[3]}, 3))}
    if name == "batch 2048":  # 5 layers on the line through 3 and 4, and measured
        out["line"] = simulate.phase_peaks(simulate.line({3: runs[3], 4: runs[4]}, 5))
        out["five"] = simulate.phase_peaks(simulate.line({5: runs[5]}, 5))
    print(json.dumps(out), flush=True)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    try:
        train.main(train.parse_config(["--model", model, "--plan", "8x80", "--simulate", "--max_len", "512",
                                       "--num_forks", "2", "--match_tokens", "16"]))
    except SystemExit as e:
        code = e.code
print(json.dumps({"name": "cli", "code": code, "printed": printed.getvalue()}))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{case: {"plan": {phase: GiB}, "sim": {phase: GiB}}}, and "cli": what --plan --simulate printed."""
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text(json.dumps(SHAPE))
    cases = {name: FLAGS + argv for name, argv in CASES.items()}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(model), json.dumps(cases)], cwd=HERE,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return {r["name"]: r for r in map(json.loads, run.stdout.strip().splitlines())}


@pytest.mark.parametrize("case", CASES)
def test_every_phase_of_the_plan_is_within_10_percent_of_the_simulated_step(measured, case):
    plan, sim = measured[case]["plan"], measured[case]["sim"]
    assert set(plan) == set(sim), (plan, sim)
    print(case, {phase: f"{plan[phase] * 1024:.1f}/{sim[phase] * 1024:.1f} MiB" for phase in plan})
    peak = max(sim.values())
    for phase in plan:
        if max(plan[phase], sim[phase]) < 0.05 * peak:
            continue  # the offloaded optimiser step holds almost nothing on the GPU
        assert abs(plan[phase] - sim[phase]) <= 0.1 * sim[phase], (case, phase, plan[phase], sim[phase])


def test_a_plan_that_ignores_a_change_of_recompute_fails_the_comparison(measured):
    """The comparison can fail: the plan with activation checkpointing against the step without it."""
    plan, sim = measured["batch 2048"]["plan"], measured["batch 2048 no checkpointing"]["sim"]
    assert sim["loss"] > 1.5 * plan["loss"] and sim["layers backward"] > 1.5 * plan["layers backward"]


def test_a_straight_line_through_3_and_4_layers_gives_the_peaks_of_5(measured):
    line, five = measured["batch 2048"]["line"], measured["batch 2048"]["five"]
    assert set(line) == set(five)
    for phase in five:
        assert abs(line[phase] - five[phase]) <= 0.01 * five[phase], (phase, line[phase], five[phase])


def test_plan_simulate_prints_the_plan_and_the_simulated_column_and_keeps_the_exit_code(measured):
    cli = measured["cli"]
    lines = cli["printed"].splitlines()
    verdict = json.loads(lines[-1])
    assert cli["code"] == 0 and verdict["fits"] and verdict["simulated_peak_gib"] >= 0
    assert verdict["simulated_s"] >= 0 and 0 < verdict["simulated_host_gib"] < 4
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["phase"] and "plan/sim" in line)
    table = [line.split() for line in lines[header + 1:header + 7]]
    names = ["matching pass", "layers forward", "loss", "layers backward", "optimizer step", "peak"]
    assert [" ".join(row[:-3]) for row in table] == names, lines[header:]
    assert all(float(row[-3]) > 0 and float(row[-2]) > 0 for row in table)  # plan and simulated GiB


def test_simulate_needs_plan(capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--simulate", "true"])
    assert "--simulate needs --plan GPUSxGiB" in capsys.readouterr().err
