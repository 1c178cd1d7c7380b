"""Tests of resume and faults (train.py through plumbing/runs.py and plumbing/fsdp.py): kills, signals,
the lock, finished runs, broken checkpoints and files, non-finite losses and diverged weights. CPU.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data

from conftest import HERE, losses


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
