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
  step 0     with --base (this alone): the optimal matchings of the first run's training questions
             before any step, the new rows as train.py starts them for each --init_seeds: is the symmetry
             between the tags already broken there, and by what?
  responses  with --responses (infer.py rows of the final model, one response per tag, greedy), the
             style of each tag's response, read from its first line (styles of tools/gsm8k_styles.py),
             and how many distinct styles the tags' most frequent ones are.
Prints markdown tables, writes OUT.json, OUT_gap.png (matching gap per step) and OUT_costs.png.

    python tools/specialisation.py --runs out/smol-hungarian out/smol-random --out out/specialisation \\
        --responses eval/smol-hungarian/heldout.all.jsonl eval/smol-random/heldout.all.jsonl
    python tools/specialisation.py --runs out/smol-hungarian --base models/SmolLM2-135M-Instruct \\
        --init_seeds 0 1 2 --out out/step0
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
    base: str = ""  # the runs' --model: with it, the optimal matchings at step 0, new rows as train.py starts them
    init_seeds: list = field(default_factory=lambda: ["0"])  # the --seed values (init noise) measured at step 0
    init_questions: int = 0  # training questions matched at step 0 (0: all of the first run's)
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

def load_final(model_dir):
    """(causal LM in fp32, eval mode, tokenizer) of a train.py final/ folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return lm.eval(), AutoTokenizer.from_pretrained(model_dir)


def initial_model(base, num_forks, seed):
    """(causal LM, tokenizer) of --model `base` with its forking-token rows as train.py starts them
    (data.init_fork_rows: the mean embedding plus a noise of 1% of its std, seeded), before any step."""
    lm, tok = load_final(base)
    import data
    num_trained = len(tok)
    data.init_fork_rows(lm, data.add_fork_tokens(tok, num_forks), num_trained, seed)
    return lm, tok


def question_costs(lm, tok, questions, match_tokens, fork_style, num_forks):
    """[Q, N, M] cost matrices (Eq. 4) of `questions` under `lm`, one question's N x M branches per
    forward (concat layout, the prompt once)."""
    import torch
    import data
    import match
    from plumbing import concat
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


def configurations(costs, question_sources):
    """Counter of the optimal configurations of [Q, N, M] costs, each a tuple of (tag, source) edges."""
    from scipy.optimize import linear_sum_assignment
    found = Counter()
    for c, qs in zip(costs, question_sources):
        forks, traces = linear_sum_assignment(c)
        found[tuple(sorted((int(f), qs[j]) for f, j in zip(forks, traces)))] += 1
    return found


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
    fig, axes = plt.subplots(1, len(runs), figsize=(5.4 * len(runs), 3.6), squeeze=False, layout="constrained")
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
        fig.colorbar(im, ax=ax, fraction=0.046, label="colour: cost - teacher's mean (own scale)")
    fig.savefig(path_costs, dpi=150, bbox_inches="tight")
    plt.close(fig)


def run_report(run, held, sims, responses=None):
    """Everything measured of one training run (see the module docstring), and its markdown lines."""
    log, conf = read_json(os.path.join(run, "matching.json")), read_json(os.path.join(run, "config.json"))
    questions = [r for _, r in read_jsonl(conf["data"])]
    sources = sorted({s for q in questions for s in q["sources"]})
    names, last = log["fork_tokens"], log["epochs"][-1]
    counts = edge_counts(last, names, sources)
    overall, per_tag = purity(counts)
    chance = chance_purity([q["sources"] for q in questions], len(names), sources, sims)
    lm, tok = load_final(os.path.join(run, "final"))
    costs = question_costs(lm, tok, held, conf["match_tokens"], conf["fork_style"], len(names))
    held_tables = cost_tables(costs, [q["sources"] for q in held], sources)
    held_purity = purity(held_tables["optimal_counts"])
    held_chance = chance_purity([q["sources"] for q in held], len(names), sources, sims)
    r = {"name": f"{os.path.basename(run.rstrip('/'))} ({log['matching']})", "run": run, "sources": sources,
         "fork_tokens": names, "matching": log["matching"], "questions": len(questions), "epochs": len(log["epochs"]),
         "configurations_per_epoch": [len(e["configurations"]) for e in log["epochs"]],
         "mean_gap_per_epoch": [e["mean_gap"] for e in log["epochs"]],
         "counts": counts.tolist(), "purity": overall, "purity_per_tag": per_tag, "chance": chance,
         "held_out": {**held_tables, "questions": len(held), "purity": held_purity[0],
                      "purity_per_tag": held_purity[1], "chance": held_chance},
         "metrics": [m for _, m in read_jsonl(os.path.join(run, "metrics.jsonl"))]}
    lines = [f"## {r['name']}: {len(questions)} questions, {r['epochs']} epochs, configurations per epoch "
             f"{r['configurations_per_epoch']}, mean gap per epoch " + ", ".join(f"{g:.4f}" for g in r["mean_gap_per_epoch"]),
             f"purity (last epoch, optimal matchings) {overall:.3f}; chance {chance[0]:.3f} (95th percentile "
             f"{chance[1]:.3f}); held-out optimal matchings {held_purity[0]:.3f}, chance {held_chance[0]:.3f} "
             f"({held_chance[1]:.3f}); held-out cost spread over tags {held_tables['spread_over_tags']:.4f}, "
             f"over a question's traces {held_tables['spread_over_traces']:.4f}",
             table("last epoch: tag x source (purity)", [f"{n} ({p:.2f})" if p is not None else n
                                                         for n, p in zip(names, per_tag)],
                   sources, [[str(x) for x in row] for row in counts]),
             table("held-out optimal matchings", [f"{n} ({p:.2f})" if p is not None else n
                                                  for n, p in zip(names, held_purity[1])],
                   sources, [[str(x) for x in row] for row in held_tables["optimal_counts"]]),
             table("held-out mean cost", names, sources, [[f"{x:.3f}" for x in row] for row in held_tables["mean_cost"]])]
    if responses:
        styles = response_styles(responses, names, sources)
        # not a purity: tags that all write one style are pure and not specialised; count the distinct styles
        r["response_styles"] = styles.tolist()
        r["response_top_styles"] = [sources[int(np.argmax(row))] if row.sum() else None for row in styles]
        lines.append(table(f"greedy response style ({len(set(r['response_top_styles']) - {None})} distinct top styles)",
                           names, sources, [[str(x) for x in row] for row in styles]))
    return r, lines


def step0_report(base, run, seed, init_questions):
    """The optimal matchings of a run's training questions before any step, the new rows as train.py
    starts them with --seed `seed`: is the symmetry between the tags broken there already?"""
    conf = read_json(os.path.join(run, "config.json"))
    questions = [r for _, r in read_jsonl(conf["data"])][:init_questions or None]
    sources = sorted({s for q in questions for s in q["sources"]})
    lm, tok = initial_model(base, conf["num_forks"], seed)
    costs = question_costs(lm, tok, questions, conf["match_tokens"], "special", conf["num_forks"])
    tables = cost_tables(costs, [q["sources"] for q in questions], sources)
    found = configurations(costs, [q["sources"] for q in questions])
    r = {"seed": seed, "questions": len(questions), "purity": purity(tables["optimal_counts"])[0],
         "configurations": [[list(map(list, c)), n] for c, n in found.most_common()],
         "spread_over_tags": tables["spread_over_tags"], "spread_over_traces": tables["spread_over_traces"],
         "counts": tables["optimal_counts"], "mean_cost": tables["mean_cost"]}
    top, n = found.most_common(1)[0]
    return r, [f"step 0, --seed {seed}: {len(found)} optimal configurations over {len(questions)} questions, the most "
               f"frequent {n} times: {dict(top)}; purity {r['purity']:.3f}; cost spread over tags "
               f"{r['spread_over_tags']:.5f}, over a question's traces {r['spread_over_traces']:.3f}"]


def main(argv=None):
    _, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    if not cfg.runs:
        sys.exit("error: need --runs OUT_DIR [OUT_DIR ...]")
    print(json.dumps(dataclasses.asdict(cfg)))
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    if cfg.base:  # step 0 only
        reports = []
        for seed in cfg.init_seeds:
            r, lines = step0_report(cfg.base, cfg.runs[0], int(seed), cfg.init_questions)
            reports.append(r)
            print("\n".join(lines), flush=True)
        with open(cfg.out + ".json", "w") as f:
            json.dump({"config": dataclasses.asdict(cfg), "step0": reports}, f, indent=1)
        return print(f"\nwrote {cfg.out}.json")
    held = [r for _, r in read_jsonl(cfg.held_out)][:cfg.limit or None]
    reports = []
    for k, run in enumerate(cfg.runs):
        r, lines = run_report(run, held, cfg.sims, cfg.responses[k] if k < len(cfg.responses) else None)
        reports.append(r)
        print("\n" + "\n".join(lines), flush=True)
    with open(cfg.out + ".json", "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "runs": [{k: v for k, v in r.items() if k != "metrics"}
                                                               for r in reports]}, f, indent=1)
    draw(reports, cfg.out + "_gap.png", cfg.out + "_costs.png", reports[0]["sources"], reports[0]["fork_tokens"])
    print(f"\nwrote {cfg.out}.json, {cfg.out}_gap.png, {cfg.out}_costs.png")


if __name__ == "__main__":
    main()
