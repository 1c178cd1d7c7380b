"""The paper's metrics: Pass@1, Cons@k, Pass@k and Pass@1 of Native Cons@N (Section 2.3, Table 1).

Computed per problem and averaged over problems (Table 1, Figures 4 and 5), from rows read by
plumbing/evalfiles.py and always re-graded from the text by plumbing/grader.py (docs/grading.md):
    pass@1         mean correctness of the n responses ("average of 32 generations")
    cons@k         majority vote of k responses taken in turn over the forking tokens, k = 2, 4, 8,
                   ... n: the paper's first k (--cons first) or its expectation (--cons expected)
    pass@k         Chen et al. (2021)'s unbiased 1 - C(n-c, k) / C(n, k), every k <= n (Figure 4)
    native_cons@N  sets of N responses, one per forking token, majority-voted and averaged over the
                   sets ("Pass@1 of Native Cons@6"; the paper's 11 sets of N = 6 take --samples 66)
    per_fork       accuracy and mean response length of each forking token (Figure 5)

    python score.py eval/ssft/aime24.all.jsonl --set_size 6   # eval/ssft/aime24.all.metrics.json
    python score.py ../shared/data/math_cot_100x8.jsonl --set_size 8   # -> eval/math_cot_100x8...
"""
import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass

from plumbing import evalfiles, score_report, votes
from plumbing.files import DataError
from plumbing.flags import check, parse_flags
from plumbing.grader import grader_name, same_answer


def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def vote_groups(completions):
    """The responses that vote, grouped: answers found equal by `same_answer` (in either order) are
    one group, and so are chains of them. [[completion, ...], ...], largest first, then by their
    smallest answer: a function of the set of responses, not of their order."""
    answers = sorted({c["pred"] for c in completions if c["pred"]})
    group_of = {}
    for i, a in enumerate(answers):  # connected components: each joins the earlier ones it equals
        linked = {group_of[b] for b in answers[:i] if same_answer(a, b)}
        target = min(linked, default=a)
        group_of = {b: target if g in linked else g for b, g in group_of.items()} | {a: target}
    groups = {}
    for c in (c for c in completions if c["pred"]):
        groups.setdefault(group_of[c["pred"]], []).append(c)
    return [groups[k] for k in sorted(groups, key=lambda k: (-len(groups[k]), k))]


def majority_vote(completions):
    """The vote of `completions` ([{"pred", "correct"}]), in [0, 1]: the largest vote group's share
    of correct responses, averaged over the largest groups when they tie (a fair coin's
    expectation); 0.0 when none has an answer, for a response without one never votes."""
    groups = vote_groups(completions)
    top = [g for g in groups if len(g) == len(groups[0])] if groups else []
    return sum(sum(bool(c["correct"]) for c in g) / len(g) for g in top) / len(top) if top else 0.0


def forks_in_tag_order(forks):
    """The distinct forking tokens of `forks` in tag order: <think2> before <think10>, whatever the
    order in which responses came."""
    def number(f):
        return int(re.search(r"\d+", f).group()) if f and re.search(r"\d+", f) else -1
    return sorted(set(forks), key=lambda f: (number(f), f or ""))


def in_turn(completions):
    """The responses one forking token at a time, in tag order: the first of each token, then the
    second of each, ... Cycle order stays as it is and block order is interleaved, so that cons@k
    votes over the same mix of tokens whatever the order (the authors' maj_sot@k)."""
    forks = forks_in_tag_order(c["fork"] for c in completions)
    if len(forks) < 2:
        return completions
    by_fork = [[c for c in completions if c["fork"] == f] for f in forks]
    return [c for turn in itertools.zip_longest(*by_fork) for c in turn if c is not None]


def cons_at_k_first(completions, k):
    """The paper's Cons@k of one problem, in [0, 1]: the majority vote of the first k responses
    taken in turn over the forking tokens (in_turn)."""
    return majority_vote(in_turn(completions)[:k])


def cons_at_k(completions, k, draws=votes.CONS_DRAWS):
    """Cons@k of one problem, in [0, 1], the default: cons_at_k_first in expectation over WHICH of
    its responses each token gives (as many as among the first k of in_turn), so no shuffle changes
    it: exact up to votes.CONS_EXACT subsets (k = n: one), else `draws` seeded draws (votes.py).
    completions: [{"pred", "correct", "fork"}]; ValueError unless 1 <= k <= n."""
    if not 1 <= k <= len(completions):
        raise ValueError(f"cons@{k} needs 1 <= k <= {len(completions)} responses")
    label = {id(c): g for g, members in enumerate(vote_groups(completions)) for c in members}
    forks = forks_in_tag_order(c["fork"] for c in completions)
    give = Counter(c["fork"] for c in in_turn(completions)[:k])
    # sorted by content: equal keys are interchangeable (same group, same grade), order is moot
    by_fork = [sorted((c for c in completions if c["fork"] == f),
                      key=lambda c: (c["pred"] or "", bool(c["correct"]))) for f in forks]
    return votes.mean_vote([[label.get(id(c), -1) for c in mine] for mine in by_fork],  # -1: none
                           [[bool(c["correct"]) for c in mine] for mine in by_fork],
                           [give[f] for f in forks], draws)


def native_sets(completions, set_size, tag_order=None):
    """Native Cons@N sets, each using every forking token once. With >= 2 forking tokens, set j =
    the j-th response of each token, whatever the row order (for block order: the authors' {j +
    kS}). Without forks, tag_order "block" splits the n responses into `set_size` token blocks as
    the authors do and set j takes the j-th of each block; else consecutive `set_size` blocks."""
    forks = forks_in_tag_order(c["fork"] for c in completions if c["fork"])
    if len(forks) >= 2:
        return [list(s) for s in zip(*[[c for c in completions if c["fork"] == f] for f in forks])]
    if tag_order == "block":
        counts = evalfiles.fair_split_counts(len(completions), set_size)
        starts = [sum(counts[:k]) for k in range(set_size)]
        return [[completions[start + j] for start in starts] for j in range(min(counts))]
    return [completions[i:i + set_size]
            for i in range(0, len(completions) - set_size + 1, set_size)]


def problem_metrics(completions, set_size, tag_order=None, ks=None, native=True, cons="expected"):
    """{metric: value in [0, 1]} of one problem's responses: cons@k for k in `ks` (default 2, 4, 8,
    ... and n; cons_at_k, or cons_at_k_first with cons "first"), pass@k for k in 2..n and
    native_cons@N over native_sets unless `native` is false (tags the model chose: --fork auto)."""
    n, c = len(completions), sum(bool(x["correct"]) for x in completions)
    vote = cons_at_k if cons == "expected" else cons_at_k_first
    ks = sorted(ks or {2 ** i for i in range(1, n.bit_length())} | {n})
    m = {"pass@1": c / n, **{f"cons@{k}": vote(completions, k) for k in ks}}
    m.update({f"pass@{k}": pass_at_k(n, c, k) for k in range(2, n + 1)})
    sets = native_sets(completions, set_size, tag_order) if native else []
    if sets:
        m[f"native_cons@{len(sets[0])}"] = sum(majority_vote(s) for s in sets) / len(sets)
    return m


def aggregate(rows, set_size, cons="expected"):
    """Means over problems of problem_metrics (Table 1), each over the problems that have it, with
    per_fork: each forking token's accuracy and mean length (Figure 5). See score_report.summary."""
    # a row with fork_policy: the model chose its tags, so no native sets
    per_problem = [problem_metrics(r["completions"], set_size, r.get("tag_order"),
                                   native="fork_policy" not in r, cons=cons) for r in rows]
    forks = forks_in_tag_order(c["fork"] for r in rows for c in r["completions"])
    return score_report.summary(rows, per_problem, forks)


def score_rows(rows, path, set_size, out="", cons="expected"):
    """aggregate's metrics of `rows` (graded by read_rows or grader.grade) with the grader's name,
    written to score_report.metrics_path (`out`, else beside the rows file `path`, else under eval/
    for a labelled data file) and printed; DataError for no rows."""
    if not rows:
        raise DataError(f"{path}: no rows to score")
    metrics = {**aggregate(rows, set_size, cons), "grader": grader_name(), "cons": cons}
    return score_report.report(metrics, rows, path, out)


@dataclass
class Config:
    rows: str = ""  # the JSONL to score: infer.py's rows, or a labelled file of another layout
    set_size: int = 6  # native_cons set size when responses use < 2 forking tokens (paper: 6)
    cons: str = "expected"  # expected: Cons@k in expectation over the responses each token gives
    # (the responses' order does not matter); first: the paper's vote of the first k responses
    out: str = ""  # the metrics JSON ('' = ROWS.metrics.json beside infer.py's rows, else
    # eval/NAME.metrics.json)


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv, positional=("rows",))
    cfg = Config(**given)
    check(parser, cfg, {"set_size": ">= 1", "cons": ("expected", "first")},
          ["give the rows file to score: python score.py ROWS.jsonl" if not cfg.rows else None])
    return cfg


def main(cfg):
    rows = evalfiles.read_rows(cfg.rows)
    return score_rows(rows, cfg.rows, cfg.set_size, cfg.out, cfg.cons)


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
