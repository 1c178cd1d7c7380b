"""score.py's report: the means over problems of its per-problem metrics (with a warning naming
the problems that have fewer responses than the rest), each forking token's accuracy and length,
the metrics file and the printed table. Only score.py uses it; the metrics themselves (votes,
pass@k, native sets) are defined in score.py.
"""
import os
import sys

from plumbing.files import write_json


def summary(rows, per_problem, forks):
    """score.aggregate's metrics: {metric: mean over problems} of per_problem ([{metric: value}],
    one per row) for the metrics of the problem with the most responses, each averaged over the
    problems that have it (counts[metric]; the others are named on stderr), then problems,
    responses, counts, unparseable (the share of responses without an answer) and per_fork."""
    sizes = [len(r["completions"]) for r in rows]
    short = [str(r.get("id", i)) for i, (r, n) in enumerate(zip(rows, sizes)) if n < max(sizes)]
    if short:
        print(f"warning: {len(short)} of {len(rows)} problems have fewer than {max(sizes)} "
              f"responses ({', '.join(short[:10])}{', ...' if len(short) > 10 else ''}); each "
              "metric is averaged over the problems that have enough responses (see counts)",
              file=sys.stderr)
    counts = {k: sum(k in m for m in per_problem) for k in per_problem[sizes.index(max(sizes))]}
    out = {k: sum(m[k] for m in per_problem if k in m) / n for k, n in counts.items()}
    responses = [c for r in rows for c in r["completions"]]
    return out | {"problems": len(rows), "responses": len(responses), "counts": counts,
                  "unparseable": sum(not c["pred"] for c in responses) / len(responses),
                  "per_fork": per_fork(responses, forks)}


def per_fork(responses, forks):
    """{fork or "none": {"responses", "accuracy", "mean_tokens" or "mean_chars"}} of graded
    responses, for `forks` in the order given (score.py: tag order; Figure 5). The length is in
    tokens where every response has its count, else in characters."""
    unit = "tokens" if all("tokens" in c for c in responses) else "chars"
    out = {}
    for fork in [f or "none" for f in forks]:
        mine = [c for c in responses if (c["fork"] or "none") == fork]
        lengths = [c["tokens"] if unit == "tokens" else len(c["text"]) for c in mine]
        out[fork] = {"responses": len(mine),
                     "accuracy": sum(c["correct"] for c in mine) / len(mine),
                     f"mean_{unit}": sum(lengths) / len(mine)}
    return out


def label_agreement(rows):
    """The share of labelled responses (sampled and models layouts) graded as their labels say;
    None without labels."""
    labelled = [c for r in rows for c in r["completions"] if isinstance(c.get("label"), bool)]
    if not labelled:
        return None
    return sum(c["label"] == bool(c["correct"]) for c in labelled) / len(labelled)


def metrics_path(path, rows, out=""):
    """Where score.py writes the metrics of the rows file `path`: `out` if given, else
    ROWS.metrics.json beside infer.py's rows, else eval/NAME.metrics.json for a labelled data file
    (rows with a layout); makes its folder."""
    beside = path.removesuffix(".jsonl") + ".metrics.json"
    if not out and any("layout" in r for r in rows):
        beside = os.path.join("eval", os.path.basename(beside))
    out = out or beside
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    return out


def report(metrics, rows, path, out=""):
    """score.py's output: `metrics` plus label_agreement where the rows have labels, written as
    JSON to metrics_path(path, rows, out) and printed as print_table; returned."""
    agreement = label_agreement(rows)
    if agreement is not None:
        metrics["label_agreement"] = agreement
    write_json(metrics_path(path, rows, out), metrics)
    print_table(metrics, path)
    return metrics


def print_table(metrics, title):
    """Prints score.py's metrics table: a header naming the grader and which Cons@k vote, the
    problem-level metrics in %, then each forking token's accuracy and mean length, then the
    agreement with the file's labels where it has them."""
    vote = {"expected": "; cons@k: the vote expected over which responses each token gives "
                        "(--cons first: the paper's first k)",
            "first": "; cons@k: the paper's vote of the first k responses"}.get(metrics.get("cons"), "")
    print(f"{title}: {metrics['problems']} problems, {metrics['responses']} responses, "
          f"{100 * metrics['unparseable']:.1f}% without an answer, "
          f"graded by {metrics.get('grader', '?')}{vote}")
    n = max(int(k[5:]) for k in metrics if k.startswith("pass@"))
    powers = {2 ** i for i in range(n.bit_length())} | {n}  # pass@k shown for k = 1, 2, 4, ... n
    shown = [k for k in metrics if k == "pass@1" or k.startswith(("cons@", "native_cons@"))
             or k.startswith("pass@") and int(k[5:]) in powers]
    counts, problems = metrics.get("counts", {}), metrics["problems"]
    for k in shown:
        over = f"  (over {counts[k]} problems)" if counts.get(k, problems) < problems else ""
        print(f"  {k:<16} {100 * metrics[k]:6.2f}{over}")
    for fork, s in metrics["per_fork"].items():
        length = ", ".join(f"{k[5:]} {v:.0f}" for k, v in s.items() if k.startswith("mean_"))
        print(f"  {fork:<16} {100 * s['accuracy']:6.2f}  "
              f"({s['responses']} responses, mean {length})")
    if "label_agreement" in metrics:
        print(f"  graded as the file's labels: {100 * metrics['label_agreement']:.2f}% of "
              "responses")
