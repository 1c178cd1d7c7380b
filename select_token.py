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

It prints the choice and the table of learned edges, each token with the trace or source it was
matched to most and in what share of the epoch's questions (a legend line says what each column
counts), writes <out_dir>/select_token.json, and draws learned_matchings.png (the bipartite graph:
tokens left, traces or sources right, edge width = weight) and matching_dynamics.png (Figures 7 and
10: configuration counts per epoch, gap and loss per step). Epochs are counted from 1.

    python select_token.py --out_dir out/ssft                # then: infer.py --fork "<think3>" ...
    python select_token.py --out_dir out/ssft --min_share 0  # every configuration of the last epoch
"""
import json
import os
from collections import Counter
from dataclasses import dataclass

import data
from plumbing import figures
from plumbing.files import DataError, read_jsonl, write_json
from plumbing.flags import parse_flags


@dataclass
class Config:
    out_dir: str = "out/ssft"  # the training run's directory, holding matching.json
    min_share: float = 0.01  # keep configurations optimal in >= this share of the epoch's questions
    epoch: int = 0  # which epoch is "late in training", counted from 1 as printed (0: the last)
    png: str = ""  # the graph's path ('' = <out_dir>/learned_matchings.png)


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    if not 0 <= cfg.min_share < 1:
        parser.error(f"--min_share must be in [0, 1) (got {cfg.min_share})")
    return cfg


def load_log(path, epoch):
    """(matching.json's whole log, the record of epoch `epoch`, counted from 1, 0 = the last);
    SystemExit naming the file. (train.py logs epochs from 0; everything shown counts from 1.)"""
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
    if not epochs:
        raise SystemExit(f"error: {path}: no epoch logged yet (the run has not finished one)")
    if not 0 <= epoch <= len(epochs):
        raise SystemExit(f"error: --epoch {epoch}: {path} has epochs 1..{len(epochs)} "
                         "(0: the last)")
    return log, epochs[epoch - 1]


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
    holding the edge}. Keys are source names (str) or trace indices (int), as train.py logged
    them."""
    edges = Counter()
    for c in configurations:
        for fork, key in c["edges"]:
            edges[(fork, key)] += c["count"]
    return edges


def choose_token(edges, num_forks):
    """Eq. 6 with Appendix A.2.1's tie-break. Returns (chosen fork index, per-fork rows [{"fork",
    "distinct", "weighted"}]): distinct = number of distinct keys the fork is matched to, weighted =
    its weighted degree. Order: most distinct, then largest weighted, then lowest index."""
    rows = [{"fork": f, "distinct": sum(1 for g, _ in edges if g == f),
             "weighted": sum(w for (g, _), w in edges.items() if g == f)} for f in range(num_forks)]
    best = max(rows, key=lambda r: (r["distinct"], r["weighted"], -r["fork"]))
    return best["fork"], rows


def top_edge(edges, fork):
    """(the key `fork` is matched to most, that edge's count, every key tied with it) of an edge
    Counter; the first of tied keys in sort_keys order leads; (None, 0, []) for a fork with no
    edge."""
    mine = {k: w for (f, k), w in edges.items() if f == fork}
    if not mine:
        return None, 0, []
    top = max(sort_keys(mine), key=lambda k: mine[k])  # max keeps the first of equal counts
    return top, mine[top], [k for k in sort_keys(mine) if mine[k] == mine[top]]


def sort_keys(keys):
    return sorted(set(keys), key=lambda k: (isinstance(k, str), k))  # trace indices, then sources


def main(cfg):
    path = os.path.join(cfg.out_dir, "matching.json")
    log, record = load_log(path, cfg.epoch)
    tokens, configs = log["fork_tokens"], record["configurations"]
    epoch = cfg.epoch or len(log["epochs"])
    chosen, rows, edges, kept = select(configs, len(tokens), cfg.min_share)
    total = sum(c["count"] for c in configs)  # one optimal matching per question of the epoch
    every = learned_edges(configs)  # the shares count every matching of the epoch, kept or not
    print(f"{path}: epoch {epoch} of {len(log['epochs'])}: {len(kept)} of {len(configs)} "
          f"configurations still accumulate mass (>= {cfg.min_share:g} of the epoch's {total} "
          f"matchings), covering "
          f"{sum(c['count'] for c in kept)} of them")
    named = "source" if any(isinstance(k, str) for _, k in every) else "trace"
    top_column = f"top {named}: count, share"
    print(f"{'token':>10} {named + 's':>7} {'weighted':>8}  {top_column:<26}  "
          f"learned edges ({named}: count)")
    for r in rows:
        mine = {k: w for (f, k), w in edges.items() if f == r["fork"]}
        r["top"], r["top_count"], r["tied"] = top_edge(every, r["fork"])
        r["share"] = r["top_count"] / max(total, 1)  # of the epoch's questions
        listed = ", ".join(f"{k}: {mine[k]}" for k in sort_keys(mine))
        mark = "*" if r["fork"] == chosen else " "
        tie = len(r["tied"]) > 1
        top = f"{len(r['tied'])}-way tie ({', '.join(map(str, r['tied']))})" if tie else r["top"]
        share = f"{top}: {r['top_count']}{' each' if tie else ''}, {100 * r['share']:.1f}%"
        name = tokens[r["fork"]]
        print(f"{mark}{name:>9} {r['distinct']:>7} {r['weighted']:>8}  {share:<26}  {listed}")
    print(f"columns: {named}s = distinct {named}s of the token's learned edges (Eq. 6: most "
          f"wins, * = chosen); weighted = their summed counts (the tie-break); top {named} = the "
          f"one it was matched to most, in how many of the epoch's {total} questions (every "
          f"configuration, kept or not) and what share of them; an N-way tie lists every {named} "
          f"matched that often (an SFT run: all of them, to its one token)")
    if named == "trace":
        print("the data has no `sources`: traces are named by their position 0..M-1 in the "
              "question, so a style here is a position (give every trace a source to see teachers "
              "or styles)")
    style = log.get("fork_style", "special")  # as trained; final/ssft.json tells infer.py the same
    final = os.path.join(cfg.out_dir, "final")
    print(f"Pass@1 token (Eq. 6): {tokens[chosen]} (tag {data.fork_tag(tokens[chosen], style)!r}); "
          f"then:\n    python infer.py --model {final} --fork \"{tokens[chosen]}\" ...")
    result = {"token": tokens[chosen], "fork": chosen, "epoch": epoch, "min_share": cfg.min_share,
              "forks": [{**r, "token": tokens[r["fork"]]} for r in rows],
              "edges": [[f, k, w] for (f, k), w in sorted(edges.items(), key=str)]}
    write_json(os.path.join(cfg.out_dir, "select_token.json"), result)
    png = cfg.png or os.path.join(cfg.out_dir, "learned_matchings.png")
    figures.draw(edges, tokens, chosen, png, sort_keys(k for _, k in edges))
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    steps = [r for _, r in read_jsonl(metrics, drop_truncated_tail=True)] \
        if os.path.exists(metrics) else []
    figures.draw_dynamics(log["epochs"], steps, os.path.join(cfg.out_dir, "matching_dynamics.png"))
    print(f"wrote {png} and {os.path.join(cfg.out_dir, 'matching_dynamics.png')}")
    return result


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
