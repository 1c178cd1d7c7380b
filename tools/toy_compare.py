"""Table 1 and Figures 4-7 in miniature: SSFT against random matching and SFT-mixed on the toy task.

Each variant is trained by train.py on the same data, seeds and step budget (--matching hungarian,
random, sft), then evaluated by the project's own inference and scoring: infer.py samples 16
responses per held-out question at the paper's T = 0.7, top_p 0.95 (SSFT and random matching: 4 per
forking token, in turn; SFT: all from its one trained token, <think1>, the paper's protocol for
single-token baselines), score.py grades them, and select_token.py picks the Pass@1
token from the run's matching.json. Every run is a real command, two at a time on a core each
(--jobs). Per variant,
summary.json holds, as {"mean", "ci95", "per_seed"} over seeds (ci95: the half-width of Student's t
interval):
    purity, distinct_styles   does each token start its own style (toy.recognise; Figures 5-6)
    pass@1                    mean accuracy over the tokens (SFT: <think1>)
    pass@1_selected           accuracy of the Eq. 6 token's responses (SFT: <think1>)
    native_cons@N             majority vote of N responses, one per token (SFT: N from <think1>)
    cons@k, pass@k            k = 1..16 (Figure 4)
    per_token                 accuracy and mean length of each token (Figure 5)
and, per metric, the difference to SFT and (for SSFT) to random matching, paired by seed (same data
and initialisation), as {"mean", "ci95", "per_seed"}. toy_compare.png draws them with the
configuration counts (Figure 7) and the matching gap (Figure 10).

SSFT + GFPO (--gfpo, on by default): each seed's SSFT model then runs gfpo.py with its toy defaults
(on the same seed's training questions), once per --gfpo_trainable (all, tag_rows), and infer.py
--fork auto answers the held-out questions with the model's own tag, greedy, before GFPO and after.
summary.json's "gfpo" holds, over seeds, the own tag's Pass@1 after GFPO and the baselines a choice
of tag is measured against, and their differences paired by seed:
    own_before        the SSFT model's own tag (no GFPO)
    best_tag          the best single tag, chosen on half of each tag's responses and scored on the
                      other half, both ways (cross-fitted, so that choosing on the scored responses
                      does not flatter it)
    mean_over_tags    SSFT's Pass@1 (its tokens in turn);  eq6: the Eq. 6 token's
    oracle            per question the tag most accurate on one half, scored on the other: the room
                      a router over tags has (cross-fitted as best_tag)
and, per question kind (toy.kind_of), each style's accuracy under SSFT and the styles the own tag
takes before and after GFPO: whether the best tag depends on the question, and whether GFPO learns it.

    python tools/toy_compare.py                    # 3 variants x 3 seeds (timings in the README)
    python tools/toy_compare.py --seeds 5          # tighter intervals
    python tools/toy_compare.py --plot_only        # redraw toy_compare.png from a finished run's summary.json
    python tools/toy_compare.py --seeds 5 --reuse  # only the runs not finished (deleted, or a stage changed)
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import score
import toy
from plumbing.files import DataError, read_json, read_jsonl, write_json
from plumbing.flags import parse_flags
from plumbing import evalfiles

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
# One colour per meaning in every figure: a variant keeps its colour in every panel, the styles take
# others, and figures.COLOURS others again (a test keeps the three apart). A new variant adds
# its entry here (tab:purple is free).
VARIANT_COLOURS = {"hungarian": "tab:blue", "random": "tab:orange", "sft": "tab:green"}
GFPO_COLOURS = {"all": "tab:purple", "tag_rows": "gold"}  # the GFPO runs, by --trainable
STYLE_COLOURS = {"left": "tab:brown", "right": "tab:pink", "place": "tab:olive", "direct": "tab:red", "other": "tab:gray"}


@dataclass
class Config:
    out_dir: str = "out/toy_compare"  # summary.json, toy_compare.png and runs/<variant>_seed<s>/
    variants: str = "hungarian,random,sft"  # train.py --matching modes: the same seeds, data and steps for each
    seeds: int = 3  # seeds 0..seeds-1 (training questions, data order, initialisation, random matchings)
    toy_questions: int = 2000  # training questions (none of them held out)
    epochs: int = 4  # passes over them, 125 steps of 64 sequences each (train.py's toy default)
    eval_questions: int = 100  # held-out questions (toy.held_out_questions), never trained on
    samples: int = 16  # responses per question: 4 per forking token, or 16 from <think1> for sft
    max_new_tokens: int = 64  # the longest trace has 45 tokens
    jobs: int = 2  # runs at a time, sharing the CPU cores (tiny models run best on one core each)
    gfpo: bool = True  # also SSFT + GFPO: gfpo.py (toy defaults) on each seed's SSFT model, then infer --fork auto
    gfpo_trainable: str = "all,tag_rows"  # gfpo.py --trainable modes, each a run per seed
    plot_only: bool = False  # run nothing: redraw <out_dir>/toy_compare.png from <out_dir>/summary.json
    reuse: bool = False  # keep the finished runs of an earlier call with the same flags; delete a run to redo it


def run_variant(variant, seed, cfg):
    """Trains one variant with train.py, then samples and scores the held-out questions with
    infer.py. Returns the run's directory; its commands' output is in run.log."""
    run_dir = os.path.join(cfg.out_dir, "runs", f"{variant}_seed{seed}")
    if finished(run_dir, ["eval"] + (["own"] if variant == "hungarian" and cfg.gfpo else []), cfg):
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # always a fresh run, never a resumed one
    os.makedirs(run_dir)
    fork = "<think1>" if variant == "sft" else "all"
    commands = [["train.py", "--matching", variant, "--seed", str(seed), "--out_dir", run_dir,
                 "--toy_questions", str(cfg.toy_questions), "--epochs", str(cfg.epochs)]]
    if variant != "sft":  # the Eq. 6 token from the run's matching.json (sft trains one token, <think1>)
        commands.append(["select_token.py", "--out_dir", run_dir])
    commands.append(["infer.py", "--model", os.path.join(run_dir, "final"), "--data", "toy", "--fork", fork,
                     "--samples", str(cfg.samples), "--limit", str(cfg.eval_questions), "--temperature", "0.7",
                     "--top_p", "0.95", "--max_new_tokens", str(cfg.max_new_tokens), "--set_size", "4",
                     "--seed", str(seed), "--output", os.path.join(run_dir, "eval.jsonl")])
    if variant == "hungarian" and cfg.gfpo:  # the SSFT model's own tag, before any GFPO
        commands.append(["infer.py", "--model", os.path.join(run_dir, "final"), *own_tag_flags(cfg, seed),
                         "--output", os.path.join(run_dir, "own.jsonl")])
    run_commands(commands, run_dir, f"{variant} seed {seed}", cfg.jobs)
    return run_dir


def finished(run_dir, outputs, cfg):
    """With --reuse: whether run_dir holds a finished run, every one of its infer.py outputs scored
    (<output>.metrics.json is written last)."""
    return cfg.reuse and all(os.path.exists(os.path.join(run_dir, f"{o}.metrics.json")) for o in outputs)


def own_tag_flags(cfg, seed):
    """infer.py's flags for the held-out questions answered with the model's own tag, greedy."""
    return ["--data", "toy", "--fork", "auto", "--samples", str(cfg.samples), "--limit", str(cfg.eval_questions),
            "--temperature", "0.7", "--top_p", "0.95", "--max_new_tokens", str(cfg.max_new_tokens), "--seed", str(seed)]


def run_commands(commands, run_dir, name, jobs):
    """Runs the scripts in turn (each [script, *flags]) on this run's share of the cores, their output
    and times in run_dir/run.log; RuntimeError naming the log when one fails."""
    threads = max(1, (os.cpu_count() or 1) // jobs)  # the cores shared out between the runs at a time
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(os.path.join(run_dir, "run.log"), "w") as log:
        for command in commands:
            t0 = time.time()
            done = subprocess.run([sys.executable, *command], cwd=HERE, env=env, stdout=log, stderr=subprocess.STDOUT)
            print(f"{name}: {command[0]} {time.time() - t0:.0f} s", file=log, flush=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(command)} failed: see {log.name}")


def run_gfpo(ssft_dir, seed, trainable, cfg):
    """GFPO (gfpo.py --trainable `trainable`) on one seed's SSFT model, then the held-out questions
    answered with the model's own tag (infer.py --fork auto, greedy). Returns the run's directory."""
    run_dir = os.path.join(cfg.out_dir, "runs", f"gfpo_{trainable}_seed{seed}")
    if finished(run_dir, ["eval"], cfg):
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    commands = [["gfpo.py", "--model", os.path.join(ssft_dir, "final"), "--seed", str(seed), "--out_dir", run_dir,
                 "--toy_questions", str(cfg.toy_questions), "--trainable", trainable],
                ["infer.py", "--model", os.path.join(run_dir, "final"), *own_tag_flags(cfg, seed),
                 "--output", os.path.join(run_dir, "eval.jsonl")]]
    run_commands(commands, run_dir, f"gfpo {trainable} seed {seed}", cfg.jobs)
    return run_dir


def own_tag_metrics(path, styles):
    """Pass@1 of a --fork auto file, and per question kind its Pass@1 and the share of questions whose
    own tag starts each style (styles: {tag: its majority style in the SSFT run})."""
    rows = evalfiles.read_rows(path)
    out = {"pass@1": score.aggregate(rows, set_size=4)["pass@1"], "kinds": {}}
    for kind in toy.KINDS:
        mine = [r for r in rows if toy.kind_of(r["prompt"]) == kind]
        chosen = Counter(styles.get(r["completions"][0]["fork"]) for r in mine)
        out["kinds"][kind] = {"pass@1": float(np.mean([c["correct"] for r in mine for c in r["completions"]])),
                              "own_style": {s: chosen[s] / len(mine) for s in toy.STYLES}}
    return out


def tag_choice_metrics(run_dir, per_token):
    """From an SSFT run's --fork all responses (each tag's in turn): each question kind's accuracy of
    each style (its tag's majority style), and, cross-fitted (choose on the first half of each tag's
    responses to a question, score on the second, and the other way round), the best single tag and
    the oracle (per question the tag most accurate on the choosing half; ties to the tag best overall)."""
    rows = evalfiles.read_rows(os.path.join(run_dir, "eval.jsonl"))
    tokens = list(per_token)
    halves = []  # per question: ({tag: [correct]} of the first half, of the second)
    for r in rows:
        seen, half = Counter(), ({t: [] for t in tokens}, {t: [] for t in tokens})
        count = Counter(c["fork"] for c in r["completions"])
        for c in r["completions"]:
            half[seen[c["fork"]] >= count[c["fork"]] / 2][c["fork"]].append(c["correct"])
            seen[c["fork"]] += 1
        halves.append(half)
    best, oracle = [], []
    for pick, scored in ((0, 1), (1, 0)):
        acc = [{t: np.mean(h[pick][t]) for t in tokens} for h in halves]
        overall = {t: np.mean([a[t] for a in acc]) for t in tokens}
        top = max(tokens, key=overall.get)
        best.append(np.mean([np.mean(h[scored][top]) for h in halves]))
        oracle.append(np.mean([np.mean(h[scored][max(tokens, key=lambda t: (a[t], overall[t]))])
                               for h, a in zip(halves, acc)]))
    kinds = {}
    for kind in toy.KINDS:
        mine = [r for r in rows if toy.kind_of(r["prompt"]) == kind]
        kinds[kind] = {t: float(np.mean([c["correct"] for r in mine for c in r["completions"] if c["fork"] == t]))
                       for t in tokens}
    styles = {t: per_token[t]["majority"] for t in tokens}
    return {"best_tag": float(np.mean(best)), "oracle": float(np.mean(oracle)), "kind_tag_accuracy": kinds,
            "styles": styles}


def gfpo_summary(results, hungarian_dirs, gfpo_dirs):
    """summary.json's "gfpo": over seeds, and paired by seed with the same seed's SSFT run: for each
    --gfpo_trainable, the own tag after GFPO against the SSFT model's own tag, the best single tag,
    the mean over tags, the Eq. 6 token and the oracle; and per kind and style the accuracies."""
    ssft = results["hungarian"]
    choice = [tag_choice_metrics(d, r["per_token"]) for d, r in zip(hungarian_dirs, ssft)]
    before = [own_tag_metrics(os.path.join(d, "own.jsonl"), c["styles"]) for d, c in zip(hungarian_dirs, choice)]
    baselines = {"own_before": [b["pass@1"] for b in before], "best_tag": [c["best_tag"] for c in choice],
                 "mean_over_tags": [r["pass@1"] for r in ssft], "eq6": [r["pass@1_selected"] for r in ssft],
                 "oracle": [c["oracle"] for c in choice]}
    out = {"baselines": {k: over_seeds(v) for k, v in baselines.items()}, "runs": {}, "kinds": {}}
    for kind in toy.KINDS:  # each style's accuracy under SSFT on this kind, over seeds
        out["kinds"][kind] = {"style_accuracy": {s: over_seeds([next((a for t, a in c["kind_tag_accuracy"][kind].items()
                                                                      if c["styles"][t] == s), np.nan) for c in choice])
                                                 for s in toy.STYLES},
                              "own_style_before": {s: float(np.mean([b["kinds"][kind]["own_style"][s] for b in before]))
                                                   for s in toy.STYLES}}
    for trainable, dirs in gfpo_dirs.items():
        after = [own_tag_metrics(os.path.join(d, "eval.jsonl"), c["styles"]) for d, c in zip(dirs, choice)]
        steps = [[m for _, m in read_jsonl(os.path.join(d, "metrics.jsonl"))] for d in dirs]
        own = [a["pass@1"] for a in after]
        out["runs"][trainable] = {
            "own_after": over_seeds(own),
            "differences": {k: over_seeds([x - y for x, y in zip(own, v)]) for k, v in baselines.items()},
            "held_out_curve": [[(m["step"] + 1, m["held_out_pass@1"]) for m in s if "held_out_pass@1" in m]
                               for s in steps],
            "mutual_info": over_seeds([s[-1]["mutual_info"] for s in steps]),
            "tag_choice": [s[-1]["tag_choice"] for s in steps],
            "kinds": {kind: {"pass@1": over_seeds([a["kinds"][kind]["pass@1"] for a in after]),
                             "own_style": {st: float(np.mean([a["kinds"][kind]["own_style"][st] for a in after]))
                                           for st in toy.STYLES}} for kind in toy.KINDS}}
    return out


def run_metrics(variant, run_dir, max_k):
    """One run's numbers: the style purity of its tokens, its accuracies, votes and pass@k, its
    Eq. 6 token, per-token accuracy and length, and its training curves."""
    rows = evalfiles.read_rows(os.path.join(run_dir, "eval.jsonl"))
    metrics = score.aggregate(rows, set_size=4)  # its per_fork holds each token's accuracy and length
    completions = [c for r in rows for c in r["completions"]]
    per_token = {}
    for f, s in metrics["per_fork"].items():
        styles = Counter(toy.recognise(c["text"]) for c in completions if c["fork"] == f)
        top = max(toy.STYLES, key=lambda style: styles[style])  # "other" never counts as a style
        per_token[f] = {"accuracy": s["accuracy"], "mean_tokens": s["mean_tokens"],
                        "styles": {style: styles[style] / s["responses"] for style in toy.STYLES + ["other"]},
                        "majority": top if styles[top] else None, "purity": styles[top] / s["responses"]}
    log = read_json(os.path.join(run_dir, "matching.json"))
    selected = read_json(os.path.join(run_dir, "select_token.json"))["token"] if variant != "sft" else "<think1>"
    native = next(v for k, v in metrics.items() if k.startswith("native_cons@"))
    out = {"purity": float(np.mean([p["purity"] for p in per_token.values()])),
           "distinct_styles": len({p["majority"] for p in per_token.values()} - {None}),
           "pass@1": metrics["pass@1"], "pass@1_selected": per_token[selected]["accuracy"], "native_cons@N": native}
    every_k = [score.problem_metrics(r["completions"], 4, ks=range(1, max_k + 1)) for r in rows]
    for k in range(1, max_k + 1):  # every k, cons@k's votes taken in turn over the tokens (score.cons_at_k)
        out[f"cons@{k}"] = float(np.mean([m[f"cons@{k}"] for m in every_k]))
        out[f"pass@{k}"] = float(np.mean([m[f"pass@{k}"] if k > 1 else m["pass@1"] for m in every_k]))
    steps = [m for _, m in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]
    return {**out, "selected": selected, "per_token": per_token,
            "configurations": [len(e["configurations"]) for e in log["epochs"]] if variant != "sft" else None,
            "loss": [m["loss"] for m in steps], "gap": [m["gap"] for m in steps]}


def over_seeds(values):
    """{"mean", "ci95", "per_seed"}: ci95 is the half-width of the 95% Student's t interval of the mean."""
    values = [float(v) for v in values]
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values)) \
        if len(values) > 1 else float("nan")
    return {"mean": float(np.mean(values)), "ci95": float(half), "per_seed": values}


def compare(cfg):
    """Every variant for every seed -> summary.json, the table (printed) and toy_compare.png."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0, load = time.time(), os.getloadavg()
    variants = cfg.variants.split(",")
    runs = sorted(((v, s) for s in range(cfg.seeds) for v in variants), key=lambda r: r[0] == "sft")  # longest first
    gfpo = cfg.gfpo and "hungarian" in variants
    with ThreadPoolExecutor(cfg.jobs) as pool:  # threads only wait on the commands
        # one queue, so that no core idles between the stages: the GFPO runs, which need their seed's
        # SSFT model, go in before the SFT runs, by when the SSFT runs queued first have finished
        futures = {r: pool.submit(run_variant, *r, cfg) for r in runs if r[0] != "sft"}
        trainables = cfg.gfpo_trainable.split(",") if gfpo else []
        gfpo_futures = {t: [pool.submit(lambda s, t: run_gfpo(futures["hungarian", s].result(), s, t, cfg), s, t)
                            for s in range(cfg.seeds)] for t in trainables}
        futures.update({r: pool.submit(run_variant, *r, cfg) for r in runs if r[0] == "sft"})
        dirs = [futures[r].result() for r in runs]
        gfpo_dirs = {t: [f.result() for f in fs] for t, fs in gfpo_futures.items()}
    results = {v: [run_metrics(v, d, cfg.samples) for (v2, _), d in zip(runs, dirs) if v2 == v] for v in variants}
    keys = ["purity", "distinct_styles", "pass@1", "pass@1_selected", "native_cons@N"] + \
        [f"{m}@{k}" for m in ("cons", "pass") for k in range(1, cfg.samples + 1)]
    summary = {"config": dataclasses.asdict(cfg), "time_s": time.time() - t0, "cpus": os.cpu_count(),
               "load_average_before": load, "variants": {}}
    for v, rs in results.items():
        tokens = list(rs[0]["per_token"])
        summary["variants"][v] = {
            **{k: over_seeds([r[k] for r in rs]) for k in keys},
            "selected": [r["selected"] for r in rs],
            "per_token": {t: {m: over_seeds([r["per_token"][t][m] for r in rs]) for m in ("accuracy", "mean_tokens")}
                          for t in tokens},
            "runs": rs}
    pairs = [(v, "sft") for v in variants if v != "sft" and "sft" in variants]
    pairs += [("hungarian", "random")] if {"hungarian", "random"} <= set(variants) else []
    summary["differences"] = {f"{a} - {b}": {k: over_seeds([x[k] - y[k] for x, y in zip(results[a], results[b])])
                                             for k in keys[2:5] + [f"cons@{cfg.samples}"]} for a, b in pairs}
    if gfpo_dirs:
        summary["gfpo"] = gfpo_summary(results, [d for (v, _), d in zip(runs, dirs) if v == "hungarian"], gfpo_dirs)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    print_table(summary)
    print(f"{cfg.seeds} seed(s), {summary['time_s']:.0f} s, {os.cpu_count()} CPUs, load average before "
          f"{load[0]:.2f}; summary in {cfg.out_dir}/summary.json")
    plot(summary, os.path.join(cfg.out_dir, "toy_compare.png"))
    return summary


def print_table(summary):
    n = summary["config"]["samples"]
    shown = ["pass@1", "pass@1_selected", "native_cons@N", f"cons@{n}", "pass@4", "purity", "distinct_styles"]
    print("\n| variant | " + " | ".join(shown) + " |\n|---|" + "---:|" * len(shown))
    for v, s in summary["variants"].items():
        print(f"| {v} | " + " | ".join(f"{s[k]['mean']:.3f} ± {s[k]['ci95']:.3f}" for k in shown) + " |")
    for pair, d in summary["differences"].items():  # paired by seed
        print(f"| {pair} | " + " | ".join(f"{d[k]['mean']:+.3f} ± {d[k]['ci95']:.3f}" if k in d else ""
                                         for k in shown) + " |")
    if "gfpo" in summary:
        print_gfpo_tables(summary["gfpo"])


def print_gfpo_tables(g):
    """The choice of tag: the own tag after GFPO against the baselines, differences paired by seed;
    per question kind, each style's accuracy and the style the own tag takes."""
    trainables = list(g["runs"])
    names = {"own_before": "SSFT's own tag (no GFPO)", "best_tag": "best single tag (cross-fitted)",
             "mean_over_tags": "mean over tags", "eq6": "Eq. 6 token", "oracle": "oracle per question (cross-fitted)"}
    print("\n| Pass@1, held-out | mean ± 95% | " + " | ".join(f"GFPO {t} - it" for t in trainables) + " |\n|---|---:|"
          + "---:|" * len(trainables))
    for t in trainables:
        print(f"| own tag after GFPO ({t}) | {fmt(g['runs'][t]['own_after'])} |" + " |" * len(trainables))
    for k, name in names.items():
        print(f"| {name} | {fmt(g['baselines'][k])} | "
              + " | ".join(fmt(g["runs"][t]["differences"][k], sign=True) for t in trainables) + " |")
    print("\n| kind | " + " | ".join(toy.STYLES) + " | own tag's style: SSFT | "
          + " | ".join(f"GFPO {t}" for t in trainables) + " |\n|---|" + "---:|" * len(toy.STYLES) + "---|" * (1 + len(trainables)))
    for kind, k in g["kinds"].items():
        shares = [k["own_style_before"]] + [g["runs"][t]["kinds"][kind]["own_style"] for t in trainables]
        print(f"| {kind} | " + " | ".join(fmt(k["style_accuracy"][s]) for s in toy.STYLES) + " | "
              + " | ".join(", ".join(f"{s} {v:.2f}" for s, v in share.items() if v >= 0.05) for share in shares) + " |")


def fmt(d, sign=False):
    return f"{d['mean']:{'+' if sign else ''}.3f} ± {d['ci95']:.3f}"


def plot(summary, path):
    """Figure 4 (pass@k), Figure 5 (per-token accuracy and length), the styles each token starts
    (seed 0) and, over training, the configuration counts (Figure 7) and the matching gap (Figure 10),
    from summary.json's contents. Epochs and steps are counted from 1, as train.py prints them."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    variants = summary["variants"]
    gfpo = summary.get("gfpo")
    fig, axes = plt.subplots(3 if gfpo else 2, 3, figsize=(14, 12 if gfpo else 8))
    k = np.arange(1, summary["config"]["samples"] + 1)
    for v, s in variants.items():
        mean = np.array([s[f"pass@{i}"]["mean"] for i in k])
        half = np.array([s[f"pass@{i}"]["ci95"] for i in k])
        axes[0][0].plot(k, mean, marker="o", markersize=3, color=VARIANT_COLOURS[v], label=v)
        axes[0][0].fill_between(k, mean - half, mean + half, color=VARIANT_COLOURS[v], alpha=0.15)
    axes[0][0].set(xscale="log", xlabel="k", ylabel="pass@k (95% interval)", title="Figure 4: coverage")
    axes[0][0].set_xticks([2 ** i for i in range(5) if 2 ** i <= k[-1]], [str(2 ** i) for i in range(5) if 2 ** i <= k[-1]])
    axes[0][0].minorticks_off()
    width = 0.8 / len(variants)
    for i, (v, s) in enumerate(variants.items()):
        tokens = list(s["per_token"])
        x = np.arange(len(tokens)) + i * width
        axes[0][1].bar(x, [s["per_token"][t]["accuracy"]["mean"] for t in tokens], width, color=VARIANT_COLOURS[v],
                       yerr=[s["per_token"][t]["accuracy"]["ci95"] for t in tokens], label=v)
        axes[0][2].bar(x, [s["per_token"][t]["mean_tokens"]["mean"] for t in tokens], width, color=VARIANT_COLOURS[v],
                       label=v)
    for ax, label in ((axes[0][1], "accuracy"), (axes[0][2], "mean response tokens")):
        ticks = list(next(iter(variants.values()))["per_token"])
        ax.set_xticks(np.arange(len(ticks)) + 0.4 - width / 2, ticks)
        ax.set(ylabel=label, title=f"Figure 5: {label} per forking token")
    ax, x, ticks = axes[1][0], 0, {}
    for v, s in variants.items():  # the styles each token starts, seed 0
        for t, p in s["runs"][0]["per_token"].items():
            bottom = 0
            for style in toy.STYLES + ["other"]:
                ax.bar(x, p["styles"][style], bottom=bottom, color=STYLE_COLOURS[style], label=style if x == 0 else None)
                bottom += p["styles"][style]
            ticks[x] = f"{v[:4]}\n{t[1:-1]}"
            x += 1
        x += 0.5  # a gap between variants
    ax.set_xticks(list(ticks), list(ticks.values()), fontsize=6)
    ax.set(ylabel="share of the token's responses (seed 0)", title="styles each token starts", ylim=(0, 1.15),
           yticks=np.linspace(0, 1, 6))
    ax.legend(fontsize=7, loc="upper center", ncol=5, columnspacing=1, handlelength=1.2)  # above the bars
    for v, s in variants.items():
        if s["runs"][0]["configurations"]:  # sft computes no costs: no configurations, no gap
            counts = np.array([r["configurations"] for r in s["runs"]])
            axes[1][1].plot(np.arange(1, counts.shape[1] + 1), counts.mean(0), marker="o", color=VARIANT_COLOURS[v], label=v)
            gaps = np.array([[g if g is not None else np.nan for g in r["gap"]] for r in s["runs"]])
            axes[1][2].plot(np.arange(1, gaps.shape[1] + 1), np.nanmean(gaps, 0), color=VARIANT_COLOURS[v], label=v)
    axes[1][1].set(xlabel="epoch", ylabel="distinct optimal configurations (mean over seeds)",
                   title="Figure 7: distinct optimal configurations")
    axes[1][2].set(xlabel="step", ylabel="mean cost of other matchings - optimal", title="Figure 10: matching gap")
    epochs = max((len(s["runs"][0]["configurations"] or []) for s in variants.values()), default=1)
    axes[1][1].set_xlim(0.5, epochs + 0.5)
    for axis in (axes[1][1].xaxis, axes[1][1].yaxis, axes[1][2].xaxis):  # whole epochs, counts and steps
        axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))
    for ax in (axes[0][0], axes[0][1], axes[1][1], axes[1][2]):
        ax.legend(fontsize=8)
    if gfpo:
        plot_gfpo(gfpo, axes[2])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figure: {path}")


def plot_gfpo(g, axes):
    """The choice of tag: each style's accuracy per question kind (SSFT), held-out Pass@1 with the
    model's own tag over GFPO's steps against the baselines, and the styles the own tag takes."""
    kinds, width = list(g["kinds"]), 0.8 / len(toy.STYLES)
    for i, style in enumerate(toy.STYLES):
        acc = [g["kinds"][k]["style_accuracy"][style] for k in kinds]
        axes[0].bar(np.arange(len(kinds)) + i * width, [a["mean"] for a in acc], width, yerr=[a["ci95"] for a in acc],
                    color=STYLE_COLOURS[style], label=style)
    axes[0].set_xticks(np.arange(len(kinds)) + 0.4 - width / 2, kinds)
    axes[0].set(ylabel="Pass@1 under the style's tag (SSFT)", title="which style is best depends on the kind")
    axes[0].legend(fontsize=7)
    for t, run in g["runs"].items():
        curves = np.array([[p for _, p in c] for c in run["held_out_curve"]])
        if curves.size:  # gfpo.py --eval_every: held-out Pass@1 along the run
            steps = [s for s, _ in run["held_out_curve"][0]]
            axes[1].plot(steps, curves.mean(0), marker="o", color=GFPO_COLOURS[t], label=f"own tag, GFPO {t}")
        else:  # only the final model's, as infer.py --fork auto answered (mean and 95% interval)
            axes[1].errorbar([toy.GFPO_DEFAULTS["steps"]], [run["own_after"]["mean"]], [run["own_after"]["ci95"]],
                             marker="o", capsize=4, color=GFPO_COLOURS[t], label=f"own tag, GFPO {t}")
    for k, style in (("best_tag", "--"), ("oracle", ":"), ("own_before", "-.")):
        axes[1].axhline(g["baselines"][k]["mean"], color="dimgray", linestyle=style, label=k.replace("_", " "))
    axes[1].set(xlabel="GFPO step", ylabel="held-out Pass@1 (mean over seeds)", title="GFPO: the model's own tag")
    axes[1].legend(fontsize=7)
    bars = [("SSFT", {k: g["kinds"][k]["own_style_before"] for k in kinds})] + \
        [(f"GFPO {t}", {k: r["kinds"][k]["own_style"] for k in kinds}) for t, r in g["runs"].items()]
    x, ticks = 0, {}
    for name, shares in bars:
        for kind in kinds:
            bottom = 0
            for style in toy.STYLES:
                axes[2].bar(x, shares[kind][style], bottom=bottom, color=STYLE_COLOURS[style])
                bottom += shares[kind][style]
            ticks[x] = f"{name}\n{kind}"
            x += 1
        x += 0.5
    axes[2].set_xticks(list(ticks), list(ticks.values()), fontsize=7)
    axes[2].set(ylabel="share of held-out questions", title="the style of the own tag, per kind", ylim=(0, 1))


if __name__ == "__main__":
    _, given = parse_flags(Config, __doc__)
    cfg = Config(**given)
    if cfg.plot_only:
        try:
            plot(read_json(os.path.join(cfg.out_dir, "summary.json")), os.path.join(cfg.out_dir, "toy_compare.png"))
        except DataError as e:
            raise SystemExit(f"error: {e}")
    else:
        print(json.dumps(dataclasses.asdict(cfg)))
        compare(cfg)
