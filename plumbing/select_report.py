"""select_token.py's input checks and output: matching.json read and validated, the table of
learned edges printed (each token's top trace or source, its share, ties named, a legend line),
and the two figures drawn. Only select_token.py uses it; the selection itself (Eq. 6) is there.
"""
import json
import os

from plumbing import figures
from plumbing.files import read_jsonl


def load_log(path, epoch):
    """(matching.json's whole log, the record of epoch `epoch`, counted from 1, 0 = the last);
    SystemExit naming the file. (train.py logs epochs from 0; everything shown counts from 1.)"""
    try:
        with open(path) as f:
            log = json.load(f)
        tokens, epochs = log["fork_tokens"], log["epochs"]
        for e in epochs:
            for c in e["configurations"]:
                forks_in_range = all(0 <= fork < len(tokens) for fork, _ in c["edges"])
                if not (forks_in_range and c["count"] >= 0):
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


def sort_keys(keys):
    return sorted(set(keys), key=lambda k: (isinstance(k, str), k))  # trace indices, then sources


def top_edge(edges, fork):
    """(the key `fork` is matched to most, that edge's count, every key tied with it) of an edge
    Counter {(fork, key): count}; the first of tied keys in sort_keys order leads; (None, 0, [])
    for a fork with no edge."""
    mine = {k: w for (f, k), w in edges.items() if f == fork}
    if not mine:
        return None, 0, []
    top = max(sort_keys(mine), key=lambda k: mine[k])  # max keeps the first of equal counts
    return top, mine[top], [k for k in sort_keys(mine) if mine[k] == mine[top]]


def add_top_edges(rows, every, total):
    """Adds to each per-fork row of choose_token ([{"fork", "distinct", "weighted"}]) "top",
    "top_count", "tied" (top_edge of `every`, the edges of all the epoch's configurations: the
    shares count every matching, kept or not) and "share" (top_count of the epoch's `total`
    questions)."""
    for r in rows:
        r["top"], r["top_count"], r["tied"] = top_edge(every, r["fork"])
        r["share"] = r["top_count"] / max(total, 1)


def print_table(path, log, epoch, min_share, kept, rows, edges, every, chosen):
    """Prints the epoch's line, one line per forking token and the columns legend. rows: per-fork
    rows of choose_token with add_top_edges's fields; edges: the learned edges of the `kept`
    configurations; every: the edges of all the epoch's configurations; chosen: the fork index
    marked *."""
    tokens, configs = log["fork_tokens"], log["epochs"][epoch - 1]["configurations"]
    total = sum(c["count"] for c in configs)  # one optimal matching per question of the epoch
    print(f"{path}: epoch {epoch} of {len(log['epochs'])}: {len(kept)} of {len(configs)} "
          f"configurations still accumulate mass (>= {min_share:g} of the epoch's {total} "
          f"matchings), covering "
          f"{sum(c['count'] for c in kept)} of them")
    named = "source" if any(isinstance(k, str) for _, k in every) else "trace"
    top_column = f"top {named}: count, share"
    print(f"{'token':>10} {named + 's':>7} {'weighted':>8}  {top_column:<26}  "
          f"learned edges ({named}: count)")
    for r in rows:
        mine = {k: w for (f, k), w in edges.items() if f == r["fork"]}
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


def draw(out_dir, png, epochs, edges, tokens, chosen):
    """Draws the learned edges as `png` ('' = <out_dir>/learned_matchings.png; Figures 3 and 8)
    and, from every epoch's record and <out_dir>/metrics.jsonl's steps where it exists,
    <out_dir>/matching_dynamics.png (Figures 7 and 10); prints the two paths."""
    png = png or os.path.join(out_dir, "learned_matchings.png")
    figures.draw(edges, tokens, chosen, png, sort_keys(k for _, k in edges))
    metrics = os.path.join(out_dir, "metrics.jsonl")
    steps = [r for _, r in read_jsonl(metrics, drop_truncated_tail=True)] \
        if os.path.exists(metrics) else []
    figures.draw_dynamics(epochs, steps, os.path.join(out_dir, "matching_dynamics.png"))
    print(f"wrote {png} and {os.path.join(out_dir, 'matching_dynamics.png')}")
