"""train.py's run around its method: the resume of the model, AdamW and the matching statistics,
the lines printed before the first step, and each step's metrics record and printed line.
"""
import math
import os

import numpy as np

from plumbing import fsdp, runs
from plumbing.files import DataError, write_json
from plumbing.matchstats import MatchingStats


def resume(model, optimizer, cfg, fork_names, rank, device):
    """(first step, MatchingStats, runs.Log) of the run in --out_dir: from its newest complete
    checkpoint (model and AdamW restored in place, the statistics read back), else step 0 and empty
    statistics; <out_dir>/matching.json rewritten from them. SystemExit on a checkpoint that does not
    read."""
    try:
        start, stats = fsdp.resume(model, optimizer, cfg.out_dir, rank, device,
                                   lambda state: MatchingStats.from_json(state["matching"]))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    stats = stats or MatchingStats(cfg.matching, fork_names, cfg.fork_style)
    log = runs.Log(cfg.out_dir, cfg, start, rank, cfg.report_to)
    if rank == 0:
        write_json(os.path.join(cfg.out_dir, "matching.json"), stats.to_json())
    return start, stats, log


def run_line(cfg, questions, encoded, plan, start, last_step, tags, fork_ids, world, device, attn):
    """The line train.py prints before its first step: the data, the ranks, the steps to run of the
    schedule `plan` ([(epoch, questions)]), the forking tags (their text `tags` and ids), the
    layout and the attention backend `attn`."""
    per_epoch = sorted({sum(e == epoch for e, _ in plan) for epoch in range(cfg.epochs)})
    per_epoch = f"{per_epoch[0]}" + (f" to {per_epoch[-1]}" if len(per_epoch) > 1 else "")
    return (f"{len(questions)} questions, {sum(len(q['traces']) for q in questions)} traces "
            f"({sum(e['truncated'] for e in encoded)} truncated to --max_len {cfg.max_len}), "
            f"{world} rank(s) on {device.type}, steps {start}..{last_step} of {len(plan)} "
            f"({per_epoch} per epoch of <= {cfg.batch_size} sequences), forking tags "
            f"{tags[0]!r}..{tags[-1]!r} = ids {fork_ids[0]}..{fork_ids[-1]}, {cfg.layout} layout, "
            f"{attn} attention")


def step_record(step, epoch, batch, matched, loss, lr, grad_norm, pad, skipped, input_tokens,
                seconds):
    """One line of metrics.jsonl: the step's questions and matched sequences, loss (nats per trace
    token), lr, gradient norm, mean matching gap, padding fraction, batches skipped so far, and
    tokens_per_s: the training pass's input tokens (prompts, tags and traces, over all ranks) per
    second of the step. matched: {question: match.Matching or None}."""
    gaps = [m.gap for m in matched.values() if m is not None and m.gap is not None]
    return {"step": step, "epoch": epoch, "questions": len(batch),
            "sequences": sum(len(m.forks) for m in matched.values() if m is not None),
            "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "gap": float(np.mean(gaps)) if gaps else None, "pad_fraction": pad,
            "skipped": skipped, "tokens_per_s": input_tokens / seconds, "time_s": seconds}


def step_line(record, last_step, left):
    """The printed line of a step_record; `left`: the estimated time still to run."""
    gap = record["gap"] if record["gap"] is not None else math.nan
    return (f"step {record['step'] + 1:5d}/{last_step} | loss {record['loss']:.4f} | lr "
            f"{record['lr']:.2e} | gap {gap:.4f} | {record['tokens_per_s']:6.0f} tok/s | pad "
            f"{record['pad_fraction']:.2f} | {left} left")
