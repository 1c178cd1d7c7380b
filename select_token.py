"""The forking token for Pass@1: the one of largest coverage in the learned matchings (Eq. 6).

When responses are not aggregated, every response uses one forking token: the one that "reasons
with more flexibility" (Section 2.3, Appendix A.2.1). train.py counts, per epoch, how often each
configuration (the set of (fork, trace) edges of one question's optimal matching) was optimal, in
<out_dir>/matching.json. Here:

  1. the configurations that still accumulate mass in the last epoch are kept: those optimal for at
     least --min_share of that epoch's matchings (a configuration that stopped being optimal, or
     that was optimal only by chance once or twice, is not a learned matching);
  2. the union of their edges is the learned matching (Figures 3 and 8), each edge weighted by the
     summed counts of the kept configurations that contain it;
  3. the chosen token is the one matched to the most distinct traces (Eq. 6), counted by source when
     the data has sources, else by trace index; a tie goes to the largest weighted degree
     (Appendix A.2.1), and a tie of both to the lowest token index.

It prints the choice and the table of learned edges, writes <out_dir>/select_token.json, and draws
learned_matchings.png (the bipartite graph: tokens left, traces or sources right, edge width = weight)
and matching_dynamics.png (Figures 7 and 10: configuration counts per epoch, gap and loss per step).

    python select_token.py --out_dir out/ssft                # then: python infer.py --fork "<think3>" ...
    python select_token.py --out_dir out/ssft --min_share 0  # every configuration optimal in the last epoch
"""
import json
import os
from collections import Counter
from dataclasses import dataclass

import data
from common import DataError, parse_flags, read_jsonl, write_json


@dataclass
class Config:
    out_dir: str = "out/ssft"  # the training run's directory, holding matching.json
    min_share: float = 0.01  # keep configurations optimal for >= this fraction of the epoch's matchings
    epoch: int = -1  # which logged epoch is "late in training" (-1: the last one)
    png: str = ""  # the graph's path ('' = <out_dir>/learned_matchings.png)


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    if not 0 <= cfg.min_share < 1:
        parser.error(f"--min_share must be in [0, 1) (got {cfg.min_share})")
    return cfg


def load_log(path, epoch):
    """(matching.json's whole log, the chosen epoch's record); SystemExit naming the file."""
    try:
        with open(path) as f:
            log = json.load(f)
        tokens, epochs = log["fork_tokens"], log["epochs"]
        for e in epochs:
            for c in e["configurations"]:
                if not (all(0 <= fork < len(tokens) for fork, _ in c["edges"]) and c["count"] >= 0):
                    raise ValueError("an edge's fork is out of range or a count is negative")
    except OSError as e:
        raise SystemExit(f"error: {path}: cannot read ({e.strerror}); run train.py first")
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path}: malformed JSON ({e.msg}, line {e.lineno})")
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"error: {path}: not a matching log (expected fork_tokens and epochs of "
                         "configurations [{edges: [[fork, key], ...], count}] with 0 <= fork < N)")
    if not -len(epochs) <= epoch < len(epochs):
        raise SystemExit(f"error: --epoch {epoch}: {path} has {len(epochs)} epochs")
    return log, epochs[epoch]


def select(configurations, num_forks, min_share):
    """Steps 1-3 above for one epoch's configurations: (chosen fork index, per-fork rows, the
    learned edges, the kept configurations)."""
    kept = learned_configurations(configurations, min_share)
    edges = learned_edges(kept)
    chosen, rows = choose_token(edges, num_forks)
    return chosen, rows, edges, kept


def learned_configurations(configurations, min_share):
    """The configurations still accumulating mass: count > 0 and count >= min_share * total count.
    configurations: [{"edges": [[fork, key], ...], "count": int}] -> the kept ones, same format."""
    total = sum(c["count"] for c in configurations)
    return [c for c in configurations if c["count"] > 0 and c["count"] >= min_share * total]


def learned_edges(configurations):
    """Union of the configurations' edges: Counter {(fork, key): summed count of the configurations
    holding the edge}. Keys are source names (str) or trace indices (int), as train.py logged them."""
    edges = Counter()
    for c in configurations:
        for fork, key in c["edges"]:
            edges[(fork, key)] += c["count"]
    return edges


def choose_token(edges, num_forks):
    """Eq. 6 with Appendix A.2.1's tie-break. Returns (chosen fork index, per-fork rows
    [{"fork", "distinct", "weighted"}]): distinct = number of distinct keys the fork is matched to,
    weighted = its weighted degree. Order: most distinct, then largest weighted, then lowest index."""
    rows = [{"fork": f, "distinct": sum(1 for g, _ in edges if g == f),
             "weighted": sum(w for (g, _), w in edges.items() if g == f)} for f in range(num_forks)]
    best = max(rows, key=lambda r: (r["distinct"], r["weighted"], -r["fork"]))
    return best["fork"], rows


def sort_keys(keys):
    return sorted(set(keys), key=lambda k: (isinstance(k, str), k))  # trace indices, then sources


def draw(edges, tokens, chosen, path):
    """Figures 3 and 8: forking tokens left, traces or sources right, edge width = weight."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    keys = sort_keys(k for _, k in edges)
    y_tok = {f: 1 - f / max(len(tokens) - 1, 1) for f in range(len(tokens))}
    y_key = {k: 1 - i / max(len(keys) - 1, 1) for i, k in enumerate(keys)}
    top = max(edges.values(), default=1)
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.45 * max(len(tokens), len(keys))))
    for (f, k), w in edges.items():
        ax.plot([0, 1], [y_tok[f], y_key[k]], color="tab:red" if f == chosen else "tab:blue",
                linewidth=0.5 + 6 * w / top, alpha=0.7)
    for f, name in enumerate(tokens):
        ax.text(-0.03, y_tok[f], name, ha="right", va="center", fontweight="bold" if f == chosen else None)
    for k in keys:
        ax.text(1.03, y_key[k], str(k), ha="left", va="center")
    ax.legend(handles=[Line2D([], [], color="tab:blue", linewidth=6.5, label=f"count {top}"),
                       Line2D([], [], color="tab:blue", linewidth=0.5 + 6 * 0.25, label=f"count {top // 4}"),
                       Line2D([], [], color="tab:red", linewidth=3, label=f"edges of {tokens[chosen]} (Eq. 6)")],
              title="edge width = times matched", loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, fontsize=8)
    ax.set_xlim(-0.4, 1.4)
    ax.axis("off")
    ax.set_title(f"learned matchings (chosen for Pass@1: {tokens[chosen]})")
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def draw_dynamics(epochs, steps, path):
    """Figures 7 and 10 of a run: per epoch the counts of the optimal configurations, most frequent
    first (a few accumulating the mass = learned matchings; a flat spread = none), the number of
    distinct ones and the top one's share; per step the matching gap and the loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for e in epochs:
        counts = sorted((c["count"] for c in e["configurations"]), reverse=True)
        axes[0].plot(range(1, len(counts) + 1), counts, marker=".", label=f"epoch {e['epoch']}")
    axes[0].set(xscale="log", yscale="log", xlabel="configuration, by rank", ylabel="times optimal",
                title="Figure 7: configuration counts per epoch")
    axes[0].legend(fontsize=7)
    x = [e["epoch"] for e in epochs]
    axes[1].plot(x, [len(e["configurations"]) for e in epochs], marker="o", label="distinct configurations")
    axes[1].set(xlabel="epoch", ylabel="distinct optimal configurations")
    share = axes[1].twinx()
    share.plot(x, [max((c["count"] for c in e["configurations"]), default=0) /
                   max(sum(c["count"] for c in e["configurations"]), 1) for e in epochs], marker="s", color="tab:orange")
    share.set(ylim=(0, 1.05))
    share.set_ylabel("share of the most frequent", color="tab:orange")
    step = [r["step"] for r in steps]
    axes[2].plot(step, [r["gap"] if r.get("gap") is not None else float("nan") for r in steps], label="gap")
    axes[2].set(xlabel="step", ylabel="mean cost of other matchings - optimal", title="Figure 10: matching gap")
    loss = axes[2].twinx()
    loss.plot(step, [r["loss"] if r.get("loss") is not None else float("nan") for r in steps], color="tab:green")
    loss.set_ylabel("loss (Eq. 5)", color="tab:green")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(cfg):
    path = os.path.join(cfg.out_dir, "matching.json")
    log, record = load_log(path, cfg.epoch)
    tokens, configs = log["fork_tokens"], record["configurations"]
    chosen, rows, edges, kept = select(configs, len(tokens), cfg.min_share)
    print(f"{path}: epoch {record.get('epoch', cfg.epoch)}: {len(kept)} of {len(configs)} configurations "
          f"still accumulate mass (>= {cfg.min_share:g} of the epoch's matchings), covering "
          f"{sum(c['count'] for c in kept)} of {sum(c['count'] for c in configs)} matchings")
    print(f"{'token':>10} {'traces':>6} {'weighted':>8}  learned edges (trace or source: weight)")
    for r in rows:
        mine = {k: w for (f, k), w in edges.items() if f == r["fork"]}
        listed = ", ".join(f"{k}: {mine[k]}" for k in sort_keys(mine))
        mark = "*" if r["fork"] == chosen else " "
        print(f"{mark}{tokens[r['fork']]:>9} {r['distinct']:>6} {r['weighted']:>8}  {listed}")
    style = log.get("fork_style", "special")  # as trained; final/ssft.json tells infer.py the same
    print(f"Pass@1 token (Eq. 6): {tokens[chosen]} (tag {data.fork_tag(tokens[chosen], style)!r}); then:\n"
          f"    python infer.py --model {os.path.join(cfg.out_dir, 'final')} --fork \"{tokens[chosen]}\" ...")
    result = {"token": tokens[chosen], "fork": chosen, "epoch": record.get("epoch"), "min_share": cfg.min_share,
              "forks": [{**r, "token": tokens[r["fork"]]} for r in rows],
              "edges": [[f, k, w] for (f, k), w in sorted(edges.items(), key=str)]}
    write_json(os.path.join(cfg.out_dir, "select_token.json"), result)
    png = cfg.png or os.path.join(cfg.out_dir, "learned_matchings.png")
    draw(edges, tokens, chosen, png)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    steps = [r for _, r in read_jsonl(metrics, drop_truncated_tail=True)] if os.path.exists(metrics) else []
    draw_dynamics(log["epochs"], steps, os.path.join(cfg.out_dir, "matching_dynamics.png"))
    print(f"wrote {png} and {os.path.join(cfg.out_dir, 'matching_dynamics.png')}")
    return result


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
