"""Answers and the paper's metrics: Pass@1, Cons@k, Pass@k and Pass@1 of Native Cons@N (Section 2.3).

Metrics (Table 1, Figures 4 and 5) are computed per problem and averaged over problems:
    pass@1         mean correctness of the n responses ("average of 32 generations")
    cons@k         majority vote of the first k responses (k = 2, 4, 8, ... and n)
    pass@k         Chen et al. (2021)'s unbiased 1 - C(n-c, k) / C(n, k), for every k <= n (Figure 4)
    native_cons@N  sets of N responses, the j-th set holding the j-th response of every forking token,
                   majority-voted and averaged over the sets ("Pass@1 of Native Cons@6"; the paper's
                   11 sets of N = 6 take --samples 66); with fewer than 2 forking tokens, consecutive
                   blocks of --set_size responses (the baselines' protocol)
    per_fork       accuracy and mean response length of each forking token (Figure 5)
Votes: answers are grouped by the test that grades them (`is_equiv`); the largest group wins, a tie
goes to the group whose answer appeared first, and responses without a \\boxed{} answer are wrong and
never vote: a set with no parseable answer counts as wrong.

infer.py writes the rows and scores them with `score_rows`; any rows file (infer.py's, or one from vLLM
with only "gold" and each completion's "text" and "fork") is scored without a model by

    python score.py eval/aime24.cycle.jsonl --set_size 6   # prints the table, writes eval/aime24.cycle.metrics.json
"""
import math
import re
from dataclasses import dataclass

from common import DataError, parse_flags, read_jsonl, write_json

try:  # optional: a symbolic equivalence test (pip install math-verify)
    from math_verify import parse as mv_parse, verify as mv_verify
except ImportError:
    mv_parse = mv_verify = None


# ----------------------------------------------------------------------------- answers

def last_boxed(text):
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try the one before
    return None


def gold_answer(answer):
    """The final answer of a gold field: a last line `#### n` (GSM8K) or `A: n` (its model solutions),
    else the last \\boxed{} in it, else all of it."""
    answer = str(answer).strip()
    last = answer.rsplit("\n", 1)[-1]
    for mark in ("####", "A:"):
        if last.startswith(mark):
            return last[len(mark):].strip().replace(",", "")
    return last_boxed(answer) or answer


def normalise(s):
    """A canonical string for the built-in comparison: no spaces, $, \\left/\\right, \\text{}, units of
    degree or percent, thousands separators or trailing period; \\dfrac and \\tfrac read as \\frac."""
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""),
                 ("$", ""), (" ", "")):
        s = s.replace(a, b)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    return s.rstrip(".")


def as_number(s):
    """The value of "12", "-0.5", "1/2" or "\\frac{1}{2}" (after normalise), else None."""
    m = re.fullmatch(r"(-?)\\frac\{?(-?[\d.]+)\}?\{?(-?[\d.]+)\}?", s) or re.fullmatch(r"(-?)(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            return (-1 if m.group(1) else 1) * float(m.group(2)) / float(m.group(3))
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def is_equiv(pred, ref):
    """Whether answer `pred` equals `ref`: math-verify when installed, else normalised strings or
    numbers equal to 1e-6 relative. The one test behind every metric, votes included."""
    if pred is None or ref is None:
        return False
    if mv_verify is not None:
        gold, target = mv_parse(f"\\boxed{{{ref}}}"), mv_parse(f"\\boxed{{{pred}}}")
        if gold and target:
            return bool(mv_verify(gold, target))
    a, b = normalise(pred), normalise(ref)
    x, y = as_number(a), as_number(b)
    return a == b or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6))


# ----------------------------------------------------------------------------- metrics

def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(completions):
    """Whether the majority answer of `completions` ([{"pred", "correct"}]) is correct. Groups are
    formed in order of first appearance, so max() (first of the largest) breaks ties toward the
    earliest answer; None predictions do not vote, and no vote at all is wrong."""
    groups = []  # [answer, votes, correct]
    for c in completions:
        if c["pred"] is None:
            continue
        for g in groups:
            if is_equiv(c["pred"], g[0]):
                g[1] += 1
                break
        else:
            groups.append([c["pred"], 1, bool(c["correct"])])
    return max(groups, key=lambda g: g[1])[2] if groups else False


def native_sets(completions, set_size):
    """Native Cons@N sets: with >= 2 forking tokens, set j = the j-th response of each token (so each
    set uses every token once, whatever the row order); else consecutive blocks of `set_size`."""
    forks = list(dict.fromkeys(c["fork"] for c in completions if c["fork"]))
    if len(forks) >= 2:
        return [list(s) for s in zip(*[[c for c in completions if c["fork"] == f] for f in forks])]
    return [completions[i:i + set_size] for i in range(0, len(completions) - set_size + 1, set_size)]


def problem_metrics(completions, set_size):
    """{metric: value} of one problem's responses; values in [0, 1]."""
    n, c = len(completions), sum(bool(x["correct"]) for x in completions)
    m = {"pass@1": c / n}
    for k in sorted({2 ** i for i in range(1, n.bit_length())} | {n}):
        m[f"cons@{k}"] = float(majority_vote(completions[:k]))
    m.update({f"pass@{k}": pass_at_k(n, c, k) for k in range(2, n + 1)})
    sets = native_sets(completions, set_size)
    if sets:
        m[f"native_cons@{len(sets[0])}"] = sum(majority_vote(s) for s in sets) / len(sets)
    return m


def aggregate(rows, set_size):
    """Means over problems of the metrics every problem has, plus per-fork accuracy and length."""
    per_problem = [problem_metrics(r["completions"], set_size) for r in rows]
    keys = [k for k in per_problem[0] if all(k in m for m in per_problem)]
    out = {k: sum(m[k] for m in per_problem) / len(rows) for k in keys}
    responses = [c for r in rows for c in r["completions"]]
    out.update(problems=len(rows), responses=len(responses),
               unparseable=sum(c["pred"] is None for c in responses) / len(responses))
    unit = "tokens" if all("tokens" in c for c in responses) else "chars"
    out["per_fork"] = {}
    for fork in dict.fromkeys(c["fork"] or "none" for c in responses):
        mine = [c for c in responses if (c["fork"] or "none") == fork]
        out["per_fork"][fork] = {"responses": len(mine), "accuracy": sum(c["correct"] for c in mine) / len(mine),
                                 f"mean_{unit}": sum(c["tokens"] if unit == "tokens" else len(c["text"])
                                                     for c in mine) / len(mine)}
    return out


def print_table(metrics, title):
    print(f"{title}: {metrics['problems']} problems, {metrics['responses']} responses, "
          f"{100 * metrics['unparseable']:.1f}% without an answer")
    n = max(int(k[5:]) for k in metrics if k.startswith("pass@"))
    shown = [k for k in metrics if k == "pass@1" or k.startswith(("cons@", "native_cons@"))
             or k.startswith("pass@") and int(k[5:]) in {2 ** i for i in range(n.bit_length())} | {n}]
    for k in shown:
        print(f"  {k:<16} {100 * metrics[k]:6.2f}")
    for fork, s in metrics["per_fork"].items():
        length = ", ".join(f"{k[5:]} {v:.0f}" for k, v in s.items() if k.startswith("mean_"))
        print(f"  {fork:<16} {100 * s['accuracy']:6.2f}  ({s['responses']} responses, mean {length})")


# ----------------------------------------------------------------------------- rows files

def read_rows(path):
    """Rows of an output file, with pred and correct filled in from text and gold where missing."""
    rows = []
    for n, row in read_jsonl(path, drop_truncated_tail=True):
        if not isinstance(row, dict) or "gold" not in row or not isinstance(row.get("completions"), list) \
                or not row["completions"] or not all(isinstance(c, dict) and "text" in c for c in row["completions"]):
            raise DataError(f"{path}:{n}: a row needs 'gold' and 'completions': [{{'text', ...}}, ...]")
        gold = gold_answer(row["gold"])
        for c in row["completions"]:
            c.setdefault("fork", None)
            if "pred" not in c:
                c["pred"] = last_boxed(c["text"])
            if "correct" not in c:
                c["correct"] = is_equiv(c["pred"], gold)
        rows.append(row)
    return rows


def score_rows(rows, path, set_size):
    """Metrics of `rows` (one per problem), written beside the rows file `path` and printed."""
    if not rows:
        raise DataError(f"{path}: no rows to score")
    metrics = aggregate(rows, set_size)
    write_json(path.removesuffix(".jsonl") + ".metrics.json", metrics)
    print_table(metrics, path)
    return metrics


@dataclass
class Config:
    rows: str = ""  # the rows JSONL to score (infer.py's output, or converted vLLM output)
    set_size: int = 6  # native_cons set size when responses use fewer than 2 forking tokens (paper: 6)


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv, positional=("rows",))
    cfg = Config(**given)
    if not cfg.rows or cfg.set_size < 1:
        parser.error("give the rows file to score (python score.py ROWS.jsonl) and --set_size >= 1")
    return cfg


def main(cfg):
    return score_rows(read_rows(cfg.rows), cfg.rows, cfg.set_size)


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
