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
  3. the chosen token is the one matched to the most distinct traces (Eq. 6), counted by source
     when the data has sources, else by trace index; a tie goes to the largest weighted degree
     (Appendix A.2.1), and a tie of both to the lowest token index.

It prints the choice and the table of learned edges (each token's most matched trace or source and
its share of the epoch's questions), writes <out_dir>/select_token.json and draws
learned_matchings.png (tokens left, traces or sources right, edge width = weight) and
matching_dynamics.png (Figures 7 and 10); plumbing/select_report.py. Epochs are counted from 1.

    python select_token.py --out_dir out/ssft                # then: infer.py --fork "<think3>" ...
    python select_token.py --out_dir out/ssft --min_share 0  # every configuration of the last epoch
"""
import os
from collections import Counter
from dataclasses import dataclass

import data
from plumbing import select_report
from plumbing.files import DataError, write_json
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
    "distinct", "weighted"}]): distinct = number of distinct keys the fork is matched to,
    weighted = its weighted degree. Order: most distinct, then largest weighted, then lowest index.
    edges: Counter {(fork, key): count} of learned_edges; num_forks: N, the rows' length."""
    rows = [{"fork": f, "distinct": sum(1 for g, _ in edges if g == f),
             "weighted": sum(w for (g, _), w in edges.items() if g == f)}
            for f in range(num_forks)]
    best = max(rows, key=lambda r: (r["distinct"], r["weighted"], -r["fork"]))
    return best["fork"], rows


def main(cfg):
    """Steps 1-3 on one epoch of <out_dir>/matching.json: prints the table and the choice, writes
    <out_dir>/select_token.json (returned) and draws the two figures."""
    path = os.path.join(cfg.out_dir, "matching.json")
    log, record = select_report.load_log(path, cfg.epoch)
    tokens, configs = log["fork_tokens"], record["configurations"]
    epoch = cfg.epoch or len(log["epochs"])
    kept = learned_configurations(configs, cfg.min_share)  # step 1
    edges = learned_edges(kept)  # step 2: the learned matching
    chosen, rows = choose_token(edges, len(tokens))  # step 3: Eq. 6
    every = learned_edges(configs)  # the shares count every matching of the epoch, kept or not
    select_report.add_top_edges(rows, every, sum(c["count"] for c in configs))
    select_report.print_table(path, log, epoch, cfg.min_share, kept, rows, edges, every, chosen)
    token, final = tokens[chosen], os.path.join(cfg.out_dir, "final")
    style = log.get("fork_style", "special")  # as trained; final/ssft.json tells infer.py the same
    print(f"Pass@1 token (Eq. 6): {token} (tag {data.fork_tag(token, style)!r}); "
          f"then:\n    python infer.py --model {final} --fork \"{token}\" ...")
    result = {"token": token, "fork": chosen, "epoch": epoch, "min_share": cfg.min_share,
              "forks": [{**r, "token": tokens[r["fork"]]} for r in rows],
              "edges": [[f, k, w] for (f, k), w in sorted(edges.items(), key=str)]}
    write_json(os.path.join(cfg.out_dir, "select_token.json"), result)
    select_report.draw(cfg.out_dir, cfg.png, log["epochs"], edges, tokens, chosen)
    return result


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
