"""Where a real model's SSFT step spends its time and memory on the CPU, against a plain Hugging Face step
on the same sequences: the profile the real-model run's settings are chosen from (README, "SSFT on a
real model").

Each variant runs in a process of its own (its peak resident memory is its own), one CPU thread:
    plain   `lm(input_ids, attention_mask=..., labels=...).loss.backward()` per question (its M
            sequences padded), clip, AdamW: what a user writes first; full logits, no recompute
    ssft    train.py's step, its own functions: the matching pass (Eq. 3-4, concat rows under the tree
            mask), the training pass (Eq. 5) with train.py's defaults for a real model (activation
            checkpointing), clip, AdamW; the model loaded and wrapped by fsdp.load_model as train.py does
    ssft_nockpt  the same without activation checkpointing
Phases: load (model + tokenizer), first step (AdamW allocates its two states), then --steps more; the
peak resident set (VmHWM, reset per phase through /proc/self/clear_refs), the CPU seconds (of this
process, steady on a shared machine where wall time is not) and the wall seconds of each phase, the
matching and training passes apart. Throughput counts trained (trace) tokens, the same in every
variant. Linux only (reads /proc).

    python tools/profile_real.py --model models/SmolLM2-135M-Instruct --data data/gsm8k_styles.train.jsonl
"""
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from plumbing.flags import parse_flags

VARIANTS = ("plain", "ssft", "ssft_nockpt")


@dataclass
class Config:
    model: str = "models/SmolLM2-135M-Instruct"  # a Hugging Face folder (tools/smollm2.py writes this one)
    data: str = "data/gsm8k_styles.train.jsonl"  # training questions; the first --questions of them make a step
    questions: int = 8  # questions per optimiser step (8 x 4 traces = train.py's --batch_size 32)
    steps: int = 2  # timed steps after the first one (the table shows their median)
    num_forks: int = 4  # N
    match_tokens: int = 32  # K
    max_len: int = 768  # tokens of a concat row
    variant: str = ""  # run one variant in this process and print its JSON ("": all, each in a subprocess)
    out: str = "out/profile_real.json"  # the table as JSON


def rss_gib(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process in GiB."""
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 2 ** 20


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def run_variant(cfg):
    """One variant's phases: {"phases": {name: {"s", "peak_gib", "rss_gib"}}, "tokens": input tokens of a step}."""
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import data
    import match
    import train
    from plumbing import datafiles
    from plumbing.ranks import close_distributed, init_distributed
    phases = {}

    def phase(name, fn):
        reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        phases.setdefault(name, []).append({"s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                            "peak_gib": rss_gib("VmHWM"), "rss_gib": rss_gib("VmRSS")})
        return out
    phases["start"] = [{"s": 0.0, "cpu_s": 0.0, "peak_gib": rss_gib("VmHWM"), "rss_gib": rss_gib("VmRSS")}]
    tcfg = train.Config(model=cfg.model, data=cfg.data, num_forks=cfg.num_forks, match_tokens=cfg.match_tokens,
                        layout="concat", max_len=cfg.max_len, micro_batch=1,
                        activation_checkpointing=cfg.variant == "ssft")
    questions = datafiles.load_questions(cfg.data)[:cfg.questions]
    rank, world, device = init_distributed()

    def load():
        tokenizer, fork_ids, num_trained = train.load_tokenizer(tcfg)
        if cfg.variant == "plain":
            from transformers import AutoModelForCausalLM
            lm = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, attn_implementation="sdpa")
            data.init_fork_rows(lm, [ids[0] for ids in fork_ids], num_trained, 0)
            model = lm
        else:
            model, _ = train.load_model(tcfg, tokenizer, fork_ids, num_trained, rank, device)
        return tokenizer, fork_ids, model
    tokenizer, fork_ids, model = phase("load", load)
    pad_id = tokenizer.pad_token_id
    encoded = [data.encode_question(tokenizer, q, cfg.max_len, 1, "batch" if cfg.variant == "plain" else "concat")
               for q in questions]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4)
    tokens = []

    def plain_step():
        from plumbing.batching import IGNORE, collate
        model.train()
        n = 0
        for q in encoded:  # one question's M sequences per forward, as the ssft step's micro_batch 1
            rows = [data.make_sequence(q["prompt_ids"], fork_ids[j], t) for j, t in enumerate(q["trace_ids"])]
            ids, labels, mask = collate(rows, pad_id)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            n += int((labels[:, 1:] != IGNORE).sum())
        tokens.append(n)

    def matching():
        return match.match_questions(model, encoded, fork_ids, "hungarian", cfg.match_tokens, 8, pad_id, device,
                                     [np.random.default_rng(k) for k in range(len(encoded))], None, "concat")

    def training(matched):
        rows = train.training_rows(encoded, matched, fork_ids, "concat")
        _, n, _, _ = train.training_pass(model, rows, 1, "concat", pad_id, device)
        tokens.append(n)

    def update():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for step in range(1 + cfg.steps):
        first = "first " if step == 0 else ""
        if cfg.variant == "plain":
            phase(first + "forward+backward", plain_step)
        else:
            matched = phase(first + "matching pass", matching)
            phase(first + "training pass", lambda: training(matched))
        phase(first + "clip+AdamW", update)
    close_distributed()
    return {"variant": cfg.variant, "tokens": tokens[-1], "params": sum(p.numel() for p in model.parameters()),
            "phases": {k: {"s": statistics.median(r["s"] for r in v), "cpu_s": statistics.median(r["cpu_s"] for r in v),
                           "peak_gib": max(r["peak_gib"] for r in v),
                           "rss_gib": v[-1]["rss_gib"]} for k, v in phases.items()}}


def step_summary(result):
    """(CPU seconds of a steady step, its wall seconds, peak GiB over the whole run) of one variant."""
    steady = [v for k, v in result["phases"].items() if not k.startswith(("first", "load", "start"))]
    return (sum(v["cpu_s"] for v in steady), sum(v["s"] for v in steady),
            max(v["peak_gib"] for v in result["phases"].values()))


def main(argv=None):
    _, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    if cfg.variant:
        if cfg.variant not in VARIANTS:
            sys.exit(f"error: --variant must be one of {', '.join(VARIANTS)} (got {cfg.variant!r})")
        print("RESULT " + json.dumps(run_variant(cfg)), flush=True)
        return
    print(json.dumps(dataclasses.asdict(cfg)))
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for v in VARIANTS:
        args = [sys.executable, os.path.abspath(__file__), *sum(([f"--{k}", str(x)] for k, x in given.items()), []),
                "--variant", v]
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"error: variant {v} failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(line[7:]))
    plain_cpu, _, plain_gib = step_summary(results[0])
    for r in results:
        cpu, wall, gib = step_summary(r)
        state = 16 * r["params"] / 2 ** 30  # fp32 weights, gradients and AdamW's two states: 16 bytes a parameter
        print(f"\n{r['variant']}: steady step {cpu:.1f} CPU s ({wall:.1f} s wall), {r['tokens'] / cpu:.1f} trained "
              f"tokens per CPU s, {cpu / plain_cpu:.2f}x plain's time; peak {gib:.2f} GiB ({gib / plain_gib:.2f}x plain; "
              f"weights + gradients + AdamW {state:.2f} GiB), {r['params'] / 1e6:.1f}M parameters")
        for name, p in r["phases"].items():
            print(f"  {name:26s} {p['cpu_s']:7.2f} CPU s {p['s']:7.2f} s wall   peak {p['peak_gib']:5.2f} GiB   "
                  f"after {p['rss_gib']:5.2f} GiB")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
