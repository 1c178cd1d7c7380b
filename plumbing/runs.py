"""A training stage's --out_dir, the same for train.py (SSFT) and gfpo.py (GFPO): the checks made before
any model loads, the step logs (metrics.jsonl, optionally TensorBoard), and where a run stops on a
signal or saves a checkpoint. Resuming is the same command on the same --out_dir: the run goes on
from its newest complete checkpoint (plumbing/fsdp.py), its logs cut back to that step.
"""
import dataclasses
import os
import signal
import sys
import time

from plumbing import fsdp
from plumbing.files import (DataError, append_jsonl, changed_settings, lock_dir, read_json, read_jsonl,
                            writable_dir, write_json, write_jsonl)
from plumbing.ranks import STOP, all_max, close_distributed, init_distributed, print0, stage_run

REPORTERS = ("", "tensorboard")  # --report_to: metrics.jsonl always, TensorBoard too when asked


def check_out_dir(out_dir, cfg, resume_free, max_steps=0):
    """Before any model loads, on every rank alike. DataError when `out_dir` holds a run made with other
    settings (every field of the config dataclass `cfg` but those in `resume_free`), a checkpoint past
    `max_steps` (a run never goes back), a metrics.jsonl that does not read, or a job running in it
    (its lock: ranks.stage_run takes it for the run); else creates it and checks that files can be
    written there."""
    changed = changed_settings(os.path.join(out_dir, "config.json"), cfg,
                               [f.name for f in dataclasses.fields(cfg) if f.name not in resume_free])
    if changed:
        raise DataError(f"{out_dir} holds a run with other settings ({', '.join(changed)}); "
                        "resume with the same flags or choose another --out_dir")
    done = fsdp.checkpoints(out_dir)
    if max_steps and done and done[-1][0] > max_steps:
        raise DataError(f"{out_dir} holds a checkpoint at step {done[-1][0]}, past --max_steps {max_steps}: "
                        "a run never goes back; choose another --out_dir to train fewer steps")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if done and os.path.exists(metrics):  # its lines before the checkpoint are kept: they must read
        read_jsonl(metrics, drop_truncated_tail=True)
    writable_dir(out_dir)
    if int(os.environ.get("RANK", 0)) == 0 and os.path.exists(os.path.join(out_dir, "lock")):
        lock_dir(out_dir).close()  # a running job's directory is refused at once, not after tokenising


def is_complete(out_dir, last_step, rank=0, rebuild=None):
    """Whether `out_dir` already holds a checkpoint at `last_step` (or later) and its final/ model; if so
    it says so, and rank 0 rebuilds each file of `rebuild` ({file name: key of the checkpoint's
    trainer_state.json}) that no longer reads as JSON, exactly as it was saved."""
    done = fsdp.checkpoints(out_dir)
    if not (done and done[-1][0] >= last_step and os.path.isdir(os.path.join(out_dir, "final"))):
        return False
    for name, key in (rebuild or {}).items() if rank == 0 else ():
        try:
            read_json(os.path.join(out_dir, name))
        except DataError:
            write_json(os.path.join(out_dir, name), read_json(os.path.join(done[-1][1], "trainer_state.json"))[key])
    print0(f"{out_dir}: complete at step {done[-1][0]}; final/ holds its model")
    return True


def check_reporter(report_to):
    """The --report_to problem for flags.check, or None: TensorBoard needs its package."""
    if report_to not in REPORTERS:
        return f"--report_to must be '' or tensorboard (got {report_to!r})"
    if report_to == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            return "--report_to tensorboard needs the tensorboard package (pip install tensorboard)"
    return None


class Log:
    """The step log of a run on rank 0: metrics.jsonl, one JSON line per step (non-finite values as null),
    and with report_to "tensorboard" the same numbers as TensorBoard scalars in <out_dir>/tensorboard.
    On creation it writes config.json and cuts metrics.jsonl back to the steps before `start`, the step
    the run resumes from (a fresh run: none), dropping a line cut by a kill. Other ranks log nothing."""

    def __init__(self, out_dir, cfg, start, rank, report_to=""):
        self.path, self.rank, self.writer = os.path.join(out_dir, "metrics.jsonl"), rank, None
        self.t0, self.start = time.time(), start
        if rank != 0:
            return
        write_json(os.path.join(out_dir, "config.json"), dataclasses.asdict(cfg))
        keep = [r for _, r in read_jsonl(self.path, drop_truncated_tail=True) if r["step"] < start] if start else []
        write_jsonl(self.path, keep)
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start)

    def write(self, record, files=None):
        """One step's record ({"step": int, name: number or list, ...}) to every log, and `files`
        ({name in out_dir: JSON object}, e.g. matching.json) rewritten."""
        if self.rank != 0:
            return
        for name, obj in (files or {}).items():
            write_json(os.path.join(os.path.dirname(self.path), name), obj)
        append_jsonl(self.path, record)
        if self.writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                    self.writer.add_scalar(name, value, record["step"])
                elif isinstance(value, list):  # per-tag numbers: one scalar per entry
                    for i, v in enumerate(value):
                        if isinstance(v, (int, float)):
                            self.writer.add_scalar(f"{name}/{i}", v, record["step"])
            self.writer.flush()

    def records(self):
        return [r for _, r in read_jsonl(self.path, drop_truncated_tail=True)]

    def time_left(self, step, last_step):
        """The time the steps after `step` (0-based, done) will take at this launch's mean pace: '12m05s'."""
        seconds = (time.time() - self.t0) / (step + 1 - self.start) * (last_step - step - 1)
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m" if seconds >= 3600 else \
            f"{int(seconds // 60)}m{int(seconds % 60):02d}s"

    def close(self):
        if self.writer is not None:
            self.writer.close()


def skip_or_stop(step, what, skip, skipped, names):
    """A step whose matching costs, loss or gradient norm are not finite (`what` says which): exits
    naming the step and the first words of its questions (`names`), unless `skip` (--skip_nonfinite),
    which skips the batch and counts it. Returns the new count of skipped batches."""
    if not skip:
        sys.exit(f"error: step {step}: {what}: {names}; --skip_nonfinite true skips such batches")
    print0(f"step {step}: {what}: batch skipped ({skipped + 1} so far)")
    return skipped + 1


def stop_or_save(step, last_step, save_every, checkpoint, device):
    """After optimiser step `step` (0-based) on every rank: when any rank got SIGTERM or SIGINT, every
    rank writes checkpoint(step + 1) and exits with 128 + the signal, and the same command resumes from
    it; otherwise a checkpoint every `save_every` steps (0: none before the end)."""
    if all_max(bool(STOP), device) and step + 1 < last_step:
        path = checkpoint(step + 1)
        print0(f"stopped by a signal after step {step + 1}: checkpoint {path}; the same command resumes")
        sys.exit(128 + (STOP[0] if STOP else signal.SIGTERM))
    if save_every and (step + 1) % save_every == 0 and step + 1 < last_step:
        checkpoint(step + 1)


def stage_main(cfg, prepare, train):
    """A training stage's run (train.py, gfpo.py): prepare(cfg) -> the run's inputs, every check that
    needs no model (a DataError exits with its one line, before the process group starts); then
    train(cfg, run, rank, world, device) on every rank, one run at a time per --out_dir."""
    try:
        run = prepare(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    rank, world, device = init_distributed()
    try:
        with stage_run(cfg.out_dir, rank):
            train(cfg, run, rank, world, device)
    finally:
        close_distributed()
