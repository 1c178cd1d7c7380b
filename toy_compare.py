"""Section 3.3 on the toy task: do the forking tokens specialise under Hungarian matching, and not
under random matching or plain SFT (Figures 5-7)?

Trains --matching hungarian, random and sft with train.py's main() on the same seeds, data and step
budget, generates from every forking token on toy.py's held-out questions (greedy, and sampled at the
paper's temperature 0.7), and writes out/toy_compare/summary.json and toy_compare.png.

    python toy_compare.py                                       # 3 variants x 3 seeds, ~5 minutes on 2 CPU cores
    python toy_compare.py --seeds 1 --variants hungarian,random # ~1 minute
"""
import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from statistics import mean, pstdev

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import data
import train
from common import parse_flags, read_jsonl, write_json
from score import last_boxed, majority_vote
from toy import STYLES, TRAIN_DEFAULTS, held_out_questions, make_questions, recognise

METRICS = ["purity", "distinct_styles", "pass@1", "cons@N"]


@dataclass
class Config:
    out_dir: str = "out/toy_compare"  # summary.json, toy_compare.png and runs/<variant>_seed<s>/
    variants: str = "hungarian,random,sft"  # train.py --matching modes, trained with the same seeds and data
    seeds: int = 3  # seeds 0..seeds-1 (data, data order, initialisation, random matchings)
    toy_questions: int = 64  # training questions (train.py's default: 256)
    epochs: int = 12  # passes over them: the same step budget for every variant
    batch_size: int = 16  # sequences per step, 4 questions (train.py's: 64): many small steps learn the format sooner
    eval_questions: int = 40  # held-out questions, none of them in any training set
    samples: int = 2  # sampled generations per forking token and question, at temperature 0.7
    max_new_tokens: int = 64  # the longest trace has ~50 tokens


@torch.no_grad()
def generate(model, tokenizer, prompts, temperature, seed, max_new_tokens):
    """Completions of `prompts` (texts ending in the forking token), in one left-padded batch:
    greedy at temperature 0, else nucleus sampling with the paper's top_p 0.95."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=0.95, top_k=0) if temperature \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    # use_cache explicitly: final/'s generation_config.json keeps training's use_cache=False
    out = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def evaluate(model, tokenizer, questions, forks, rounds, temperature, seed, max_new_tokens):
    """One record per generation: `rounds` rounds, each prompting every question once with every
    token in `forks`. Cons@N votes within a (question, round)."""
    jobs = [(q, k, f) for q in range(len(questions)) for k in range(rounds) for f in forks]
    texts = generate(model, tokenizer, [data.build_text(tokenizer, questions[q]["prompt"], f) for q, _, f in jobs],
                     temperature, seed, max_new_tokens)
    return [{"question": q, "round": k, "fork": f, "style": recognise(t), "pred": last_boxed(t),
             "gold": questions[q]["answer"], "correct": last_boxed(t) == questions[q]["answer"]}
            for (q, k, f), t in zip(jobs, texts)]


def summarise(records):
    """Per token: the style distribution of its generations, its majority style (one of the four:
    "other" never counts) and Pass@1. Over tokens: purity (the fraction of a token's generations in
    its majority style, averaged over tokens), distinct_styles (the number of different majority
    styles), Pass@1 (mean over tokens) and Cons@N (mean over rounds of the round's majority vote,
    infer.py's rule: a tie goes to the answer seen first, no answer is wrong)."""
    per_fork, rounds = {}, defaultdict(list)
    for f in dict.fromkeys(r["fork"] for r in records):
        mine = [r for r in records if r["fork"] == f]
        counts = Counter(r["style"] for r in mine)
        top = max(STYLES, key=lambda s: counts[s])
        per_fork[f] = {"styles": {s: counts[s] / len(mine) for s in STYLES + ["other"]},
                       "majority": top if counts[top] else None, "purity": counts[top] / len(mine),
                       "pass@1": sum(r["correct"] for r in mine) / len(mine)}
    for r in records:
        rounds[r["question"], r["round"]].append(r)
    return {"purity": mean(p["purity"] for p in per_fork.values()),
            "distinct_styles": len({p["majority"] for p in per_fork.values()} - {None}),
            "pass@1": mean(p["pass@1"] for p in per_fork.values()),
            "cons@N": float(mean(majority_vote(r) for r in rounds.values())), "per_fork": per_fork}


def configuration_counts(run_dir):
    """Figure 7's view from matching.json: per epoch, the number of distinct optimal configurations
    and the share of the questions in the most common one. Under random matching the statistics
    record the optimal configuration too, as in Figure 7(a)."""
    with open(os.path.join(run_dir, "matching.json")) as f:
        epochs = json.load(f)["epochs"]
    return {"distinct": [len(e["configurations"]) for e in epochs],
            "top_share": [e["configurations"][0]["count"] / e["questions"] for e in epochs]}


def run_variant(variant, seed, cfg, held_out):
    """Trains one variant with train.py's own main(), then evaluates its final/ model on `held_out`.
    Views: all N tokens, greedy and sampled; for sft also its one trained token, <think1>, with N
    generations per round (the paper's protocol for single-token baselines)."""
    run_dir = os.path.join(cfg.out_dir, "runs", f"{variant}_seed{seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # always a fresh run, never a resumed one
    os.makedirs(run_dir)
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log, contextlib.redirect_stdout(log):
        train.main(train.parse_config([f"--{k}={v}" for k, v in dict(
            matching=variant, seed=seed, out_dir=run_dir, toy_questions=cfg.toy_questions, epochs=cfg.epochs,
            batch_size=cfg.batch_size).items()]))
    t1 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(run_dir, "final"))
    model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final"), dtype=torch.float32).eval()
    forks = data.fork_tokens(TRAIN_DEFAULTS["num_forks"])
    views = {"greedy": (forks, 1, 0.0), "sampled": (forks, cfg.samples, 0.7)}
    if variant == "sft":
        views.update(think1_greedy=(forks[:1], 1, 0.0), think1_sampled=(forks[:1] * len(forks), cfg.samples, 0.7))
    result = {name: summarise(evaluate(model, tokenizer, held_out, f, k, temp, seed, cfg.max_new_tokens))
              for name, (f, k, temp) in views.items()}
    steps = [m for _, m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
    return {**result, "configurations": configuration_counts(run_dir) if variant != "sft" else None,  # no costs
            "loss": [m["loss"] for m in steps], "gap": [m["gap"] for m in steps],
            "time_s": {"train": t1 - t0, "evaluate": time.time() - t1}}


def aggregate(runs, view):
    """Mean over seeds, standard deviation over seeds and per-seed values of the metrics of a view."""
    per_seed = {k: [r[view][k] for r in runs] for k in METRICS}
    return {**{k: mean(v) for k, v in per_seed.items()}, "std": {k: pstdev(v) for k, v in per_seed.items()},
            "per_seed": per_seed}


def compare(cfg):
    """Every variant for every seed on the same held-out questions -> summary.json: per variant the
    sampled (T=0.7) metrics over the N tokens, then "greedy", and for sft "think1"/"think1_greedy"."""
    hf_logging.disable_progress_bar()
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0, load = time.time(), os.getloadavg()
    seen = {q["prompt"] for s in range(cfg.seeds) for q in make_questions(cfg.toy_questions, s)}
    held_out = held_out_questions(cfg.eval_questions, exclude=seen)
    runs = defaultdict(list)
    for seed in range(cfg.seeds):
        for variant in cfg.variants.split(","):
            r = run_variant(variant, seed, cfg, held_out)
            runs[variant].append(r)
            s = r["sampled"]
            print(f"seed {seed} {variant:<9} | purity {s['purity']:.2f} | distinct {s['distinct_styles']} | "
                  f"pass@1 {s['pass@1']:.3f} | cons@N {s['cons@N']:.3f} | train {r['time_s']['train']:.0f} s | "
                  + " ".join(f"{f} {p['majority']} {p['purity']:.2f}" for f, p in s["per_fork"].items()), flush=True)
    summary = {"config": dataclasses.asdict(cfg), "time_s": time.time() - t0, "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "load_average_before": load}
    rows = []
    for variant, rs in runs.items():
        summary[variant] = {**aggregate(rs, "sampled"), "greedy": aggregate(rs, "greedy"), "runs": rs}
        rows += [(variant, "T=0.7", summary[variant]), (variant, "greedy", summary[variant]["greedy"])]
        if variant == "sft":
            summary[variant].update(think1=aggregate(rs, "think1_sampled"), think1_greedy=aggregate(rs, "think1_greedy"))
            rows += [("sft, <think1> only", "T=0.7", summary[variant]["think1"]),
                     ("sft, <think1> only", "greedy", summary[variant]["think1_greedy"])]
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    print(f"\n| variant | decoding | {' | '.join(METRICS)} |\n|---|---|" + "---:|" * len(METRICS))
    for name, decoding, s in rows:
        print(f"| {name} | {decoding} | " + " | ".join(f"{s[k]:.3f} ± {s['std'][k]:.3f}" for k in METRICS) + " |")
    for variant, rs in runs.items():
        if rs[0]["configurations"]:
            print(f"{variant}: distinct optimal configurations per epoch (mean over seeds): "
                  f"{np.mean([r['configurations']['distinct'] for r in rs], 0).round(1).tolist()}")
    print(f"{cfg.seeds} seed(s), {summary['time_s']:.0f} s, {os.cpu_count()} CPUs, load average before "
          f"{load[0]:.2f}; summary in {cfg.out_dir}/summary.json")
    plot(summary, os.path.join(cfg.out_dir, "toy_compare.png"))
    return summary


def plot(summary, path):
    """Per-token style histograms (seed 0, T=0.7) of each variant side by side, as the paper's Figures
    5-6, and over training the configuration counts (Figure 7) and the matching gap (Figure 10)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no figure")
        return
    variants = [v for v in ("hungarian", "random", "sft") if v in summary]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    colours = dict(zip(STYLES + ["other"], ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:gray"]))
    for ax, v in zip(axes[0], variants):
        per_fork = summary[v]["runs"][0]["sampled"]["per_fork"]
        bottom = np.zeros(len(per_fork))
        for style, colour in colours.items():
            share = np.array([p["styles"][style] for p in per_fork.values()])
            ax.bar(list(per_fork), share, bottom=bottom, color=colour, label=style)
            bottom += share
        ax.set_title(f"{v}: purity {summary[v]['purity']:.2f}, distinct {summary[v]['distinct_styles']:.1f}")
    axes[0][0].set_ylabel("styles of the generations (seed 0, T=0.7)")
    axes[0][0].legend(loc="lower left", fontsize=8)
    for ax, key, label in ((axes[1][0], "distinct", "distinct optimal configurations"),
                           (axes[1][1], "top_share", "share of the most common configuration")):
        for v in variants:
            if summary[v]["runs"][0]["configurations"]:
                curves = np.array([r["configurations"][key] for r in summary[v]["runs"]])
                epochs = np.arange(1, curves.shape[1] + 1)
                ax.plot(epochs, curves.mean(0), marker="o", label=v)
                ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.2)  # over seeds
        ax.set(xlabel="epoch", ylabel=label)
    for v in variants:
        if summary[v]["runs"][0]["configurations"]:  # sft computes no costs, hence no gap
            axes[1][2].plot(np.mean([r["gap"] for r in summary[v]["runs"]], 0), label=v)
    axes[1][2].set(xlabel="step", ylabel="matching gap: other matchings - optimal")
    for ax in axes[1]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    _, given = parse_flags(Config, __doc__)
    print(json.dumps(dataclasses.asdict(Config(**given))))
    compare(Config(**given))
