"""Do the forking tokens specialise by teacher? The measurements of the real-model run (Section 3.3,
Figures 7-8), for an SSFT run and its random-matching control trained on the same data and budget.

  purity     per tag, the share of its matched traces that come from its most frequent source, in an
             epoch's optimal matchings (matching.json: the optimum is counted under random matching
             too, Figure 7a); overall, the sum of the tags' top counts over all counts. Chance: the
             same sizes (each question's sources, N tags) under uniformly random injective matchings,
             simulated: its mean and 95th percentile.
  held-out   on questions never trained on, the final model's cost matrix (Eq. 4, the run's K) of every
             question: mean cost of each tag on each teacher's traces; the spread of a trace's cost
             across tags against the spread of a tag's cost across teachers; the held-out optimal
             matchings' purity.
  responses  with --responses (infer.py rows of the final model, one response per tag, greedy), the
             style of each tag's response, read from its first line (styles of tools/gsm8k_styles.py).
Prints markdown tables, writes OUT.json, OUT_gap.png (matching gap per step) and OUT_costs.png.

    python tools/specialisation.py --runs out/smol-ssft out/smol-random \\
        --held_out data/gsm8k_styles.heldout.jsonl --out docs/real_model
"""
import dataclasses
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from plumbing.files import read_json, read_jsonl
from plumbing.flags import parse_flags


@dataclass
class Config:
    runs: list = field(default_factory=list)  # train.py --out_dir folders (matching.json, metrics.jsonl, final/)
    held_out: str = "data/gsm8k_styles.heldout.jsonl"  # questions never trained on, with traces and sources
    limit: int = 0  # only the first `limit` held-out questions (0: all)
    responses: list = field(default_factory=list)  # infer.py rows JSONL per run, in --runs order (optional)
    sims: int = 2000  # random matchings simulated for each chance level
    out: str = "out/specialisation"  # OUT.json, OUT_gap.png, OUT_costs.png


# ----------------------------------------------------------------------------- purity

def purity(counts):
    """counts: [N tags, S sources] -> (overall purity, [purity of each tag] (None for a tag never
    matched)). A tag's purity is its top source's share of its matched traces."""
    counts = np.asarray(counts, dtype=float)
    per_tag = [float(row.max() / row.sum()) if row.sum() else None for row in counts]
    return float(counts.max(1).sum() / max(counts.sum(), 1)), per_tag


def edge_counts(epoch_record, fork_names, sources):
    """[N, S] counts of (tag, source) edges of one matching.json epoch record."""
    counts = np.zeros((len(fork_names), len(sources)), dtype=int)
    for e in epoch_record["edges"]:
        counts[e["fork"], sources.index(e["source"])] += e["count"]
    return counts


def chance_purity(question_sources, num_forks, sources, sims, seed=0):
    """(mean, 95th percentile) of the overall purity of uniformly random injective matchings of the
    same questions (question_sources[q]: the source of each of q's traces) to num_forks tags."""
    rng = np.random.default_rng(seed)
    index = [np.array([sources.index(s) for s in qs]) for qs in question_sources]
    values = []
    for _ in range(sims):
        counts = np.zeros((num_forks, len(sources)))
        for idx in index:
            k = min(num_forks, len(idx))
            forks, traces = rng.permutation(num_forks)[:k], rng.permutation(len(idx))[:k]
            np.add.at(counts, (forks, idx[traces]), 1)
        values.append(purity(counts)[0])
    return float(np.mean(values)), float(np.quantile(values, 0.95))


# ----------------------------------------------------------------------------- held-out costs

def held_out_costs(model_dir, questions, match_tokens, fork_style, num_forks):
    """[Q, N, M] cost matrices (Eq. 4) of the held-out questions under the final model, one question's
    N x M branches per forward (concat layout, the prompt once)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import data
    import match
    from plumbing import concat
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    nll = match.SequenceNLL(lm).eval()
    fork_ids = data.fork_ids(tok, num_forks, fork_style)
    costs = []
    for q in questions:
        enc = data.encode_question(tok, q, 100_000, max(map(len, fork_ids)))
        c = concat.branch_costs(nll, [enc], fork_ids, match_tokens, len(fork_ids) * len(q["traces"]),
                                tok.pad_token_id, torch.device("cpu"))
        costs.append(c.view(len(fork_ids), len(q["traces"])).numpy())
    return np.stack(costs)


def cost_tables(costs, question_sources, sources):
    """From [Q, N, M] costs: mean cost [N, S] of each tag on each source's traces; the mean spread of
    a trace's cost over tags (max - min) and of a tag's cost over a question's traces; and the
    [N, S] counts of the held-out optimal (Hungarian) matchings."""
    from scipy.optimize import linear_sum_assignment
    n = costs.shape[1]
    by_source, seen = np.zeros((n, len(sources))), np.zeros(len(sources))
    optimal = np.zeros((n, len(sources)), dtype=int)
    for c, qs in zip(costs, question_sources):
        idx = [sources.index(s) for s in qs]
        for j, s in enumerate(idx):
            by_source[:, s] += c[:, j]
            seen[s] += 1
        forks, traces = linear_sum_assignment(c)
        for f, j in zip(forks, traces):
            optimal[f, idx[j]] += 1
    return {"mean_cost": (by_source / seen).tolist(),
            "spread_over_tags": float((costs.max(1) - costs.min(1)).mean()),
            "spread_over_traces": float((costs.max(2) - costs.min(2)).mean()),
            "optimal_counts": optimal.tolist()}


# ----------------------------------------------------------------------------- responses

def style_of(text):
    """The style of a response by its first line: python (a code fence or `name = expression`), backward
    ("We need"), equations (only numbers and operators, then "= number"), else prose."""
    first = text.strip().split("\n", 1)[0].strip()
    if first.startswith("```") or re.fullmatch(r"[a-z_][a-z0-9_]* = [^=]+", first):  # "Rug = 3 + 5 = 8 feet" is prose
        return "python"
    if first.lower().startswith("we need"):
        return "backward"
    if re.fullmatch(r"[\d\s.+\-*/()x]+=\s*-?[\d.]+", first):
        return "equations"
    return "prose"


def response_styles(rows_path, fork_names, sources):
    """[N, S] counts of the style of each tag's responses in infer.py rows."""
    counts = np.zeros((len(fork_names), len(sources)), dtype=int)
    for _, row in read_jsonl(rows_path):
        for c in row["completions"]:
            counts[fork_names.index(c["fork"]), sources.index(style_of(c["text"]))] += 1
    return counts


# ----------------------------------------------------------------------------- report

def table(title, rows, cols, cells):
    lines = [f"| {title} | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    return "\n".join(lines + [f"| {r} | " + " | ".join(c) + " |" for r, c in zip(rows, cells)])


def draw(runs, path_gap, path_costs, sources, fork_names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for r in runs:
        steps = [m for m in r["metrics"] if m.get("gap") is not None]
        ax.plot([m["step"] + 1 for m in steps], [m["gap"] for m in steps], label=r["name"], marker=".", lw=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("matching gap (nats/token)")
    ax.set_title("mean cost of the other matchings minus the optimal one (Figure 10)")
    ax.legend()
    fig.savefig(path_gap, dpi=150, bbox_inches="tight")
    plt.close(fig)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, r in zip(axes[0], runs):
        m = np.array(r["held_out"]["mean_cost"])
        centred = m - m.mean(0, keepdims=True)  # each teacher's column centred: what differs between tags
        im = ax.imshow(centred, cmap="coolwarm", vmin=-abs(centred).max(), vmax=abs(centred).max())
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(sources)), sources, rotation=30)
        ax.set_yticks(range(len(fork_names)), fork_names)
        ax.set_title(f"{r['name']}: held-out cost", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, label="minus the teacher's mean over tags")
    fig.savefig(path_costs, dpi=150, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    _, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    if not cfg.runs:
        sys.exit("error: need --runs OUT_DIR [OUT_DIR ...]")
    print(json.dumps(dataclasses.asdict(cfg)))
    held = [r for _, r in read_jsonl(cfg.held_out)][:cfg.limit or None]
    reports, sources = [], None
    for k, run in enumerate(cfg.runs):
        log, conf = read_json(os.path.join(run, "matching.json")), read_json(os.path.join(run, "config.json"))
        questions = [r for _, r in read_jsonl(conf["data"])]
        sources = sources or sorted({s for q in questions for s in q["sources"]})
        names, last = log["fork_tokens"], log["epochs"][-1]
        counts = edge_counts(last, names, sources)
        overall, per_tag = purity(counts)
        chance = chance_purity([q["sources"] for q in questions], len(names), sources, cfg.sims)
        costs = held_out_costs(os.path.join(run, "final"), held, conf["match_tokens"], conf["fork_style"], len(names))
        held_tables = cost_tables(costs, [q["sources"] for q in held], sources)
        held_purity = purity(held_tables["optimal_counts"])
        held_chance = chance_purity([q["sources"] for q in held], len(names), sources, cfg.sims)
        report = {"name": f"{os.path.basename(run.rstrip('/'))} ({log['matching']})", "run": run,
                  "matching": log["matching"], "epochs": len(log["epochs"]), "last_epoch_questions": last["questions"],
                  "configurations_per_epoch": [len(e["configurations"]) for e in log["epochs"]],
                  "mean_gap_per_epoch": [e["mean_gap"] for e in log["epochs"]],
                  "counts": counts.tolist(), "purity": overall, "purity_per_tag": per_tag, "chance": chance,
                  "held_out": {**held_tables, "purity": held_purity[0], "purity_per_tag": held_purity[1],
                               "chance": held_chance},
                  "metrics": [m for _, m in read_jsonl(os.path.join(run, "metrics.jsonl"))]}
        if k < len(cfg.responses):
            styles = response_styles(cfg.responses[k], names, sources)
            report["response_styles"] = styles.tolist()
            report["response_purity"] = purity(styles)[0]
        reports.append(report)
        print(f"\n## {report['name']}: {len(questions)} questions, {report['epochs']} epochs, "
              f"configurations per epoch {report['configurations_per_epoch']}, mean gap per epoch "
              + ", ".join(f"{g:.4f}" for g in report["mean_gap_per_epoch"]))
        print(f"purity (last epoch, optimal matchings) {overall:.3f}; chance {chance[0]:.3f} (95th percentile "
              f"{chance[1]:.3f}); held-out optimal matchings {held_purity[0]:.3f}, chance {held_chance[0]:.3f} "
              f"({held_chance[1]:.3f}); held-out cost spread over tags {held_tables['spread_over_tags']:.4f}, "
              f"over a question's traces {held_tables['spread_over_traces']:.4f}")
        print(table("last epoch: tag x source (purity)", [f"{n} ({p:.2f})" if p is not None else n
                                                          for n, p in zip(names, per_tag)],
                    sources, [[str(x) for x in row] for row in counts]))
        print(table("held-out mean cost", names, sources,
                    [[f"{x:.3f}" for x in row] for row in held_tables["mean_cost"]]))
        if "response_styles" in report:
            print(table(f"greedy response style (purity {report['response_purity']:.2f})", names, sources,
                        [[str(x) for x in row] for row in report["response_styles"]]))
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out + ".json", "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "sources": sources,
                   "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in reports]}, f, indent=1)
    draw(reports, cfg.out + "_gap.png", cfg.out + "_costs.png", sources, names)
    print(f"\nwrote {cfg.out}.json, {cfg.out}_gap.png, {cfg.out}_costs.png")


if __name__ == "__main__":
    main()
