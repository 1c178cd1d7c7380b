"""The paper's metrics: Pass@1, Cons@k, Pass@k and Pass@1 of Native Cons@N (Section 2.3, Table 1).

Each response is graded by plumbing/grader.py (its answer, and whether it equals the gold). The
metrics are computed per problem and averaged over problems (Table 1, Figures 4 and 5):
    pass@1         mean correctness of the n responses ("average of 32 generations")
    cons@k         majority vote of k responses taken in turn over the forking tokens (one of each
                   token, then a second of each, ...), for k = 2, 4, 8, ... and n
    pass@k         Chen et al. (2021)'s unbiased 1 - C(n-c, k) / C(n, k), every k <= n (Figure 4)
    native_cons@N  sets of N responses, one per forking token, majority-voted and averaged over the
                   sets ("Pass@1 of Native Cons@6"; the paper's 11 sets of N = 6 take --samples 66)
    per_fork       accuracy and mean response length of each forking token (Figure 5)
A vote groups answers the grader finds equal; the largest group wins and is worth the share of its
responses graded correct, a tie is worth the mean of the tied groups (a fair coin's expectation), a
response without an answer never votes, and a vote with no answer counts as wrong.

The paper's Cons@k votes the first k responses (`cons_at_k_first`, --cons first). That depends on
which responses came first; the default (--cons expected, `cons_at_k`) is its expectation over which
of its responses each token gives, so that no metric changes when the responses are shuffled (for
k = n the two are one vote). Rows files (infer.py's, sampled, models' solutions) are read by
plumbing/evalfiles.py; scoring always re-grades from the text (docs/grading.md).

    python score.py eval/ssft/aime24.all.jsonl --set_size 6   # eval/ssft/aime24.all.metrics.json
    python score.py ../shared/data/math_cot_100x8.jsonl --set_size 8   # -> eval/math_cot_100x8...
"""
import itertools
import math
import os
import re
from collections import Counter
from dataclasses import dataclass

from plumbing import evalfiles, votes
from plumbing.files import DataError
from plumbing.flags import check, parse_flags
from plumbing.grader import grader_name, same_answer


# ----------------------------------------------------------------------------- votes

def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def vote_groups(completions):
    """The responses that vote, grouped: answers found equal by `same_answer` (in either order of
    the responses) are one group, and so are chains of them. [[completion, ...], ...], largest
    first, then by their smallest answer: a function of the set of responses, not of their order."""
    answers = sorted({c["pred"] for c in completions if c["pred"]})
    group_of = {}
    for i, a in enumerate(answers):  # connected components: each joins the earlier ones it equals
        linked = {group_of[b] for b in answers[:i] if same_answer(a, b)}
        target = min(linked, default=a)
        for b, g in group_of.items():
            if g in linked:
                group_of[b] = target
        group_of[a] = target
    groups = {}
    for c in completions:
        if c["pred"]:
            groups.setdefault(group_of[c["pred"]], []).append(c)
    return [groups[k] for k in sorted(groups, key=lambda k: (-len(groups[k]), k))]


def majority_vote(completions):
    """The vote of `completions` ([{"pred", "correct"}]), in [0, 1]: the largest group's share of
    correct responses, averaged over the largest groups when they tie; 0.0 when none has an
    answer."""
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
    its responses each token gives (as many as it has among the first k of in_turn), so that the
    order of the responses does not matter. The mean over every subset the tokens can give when
    there are at most votes.CONS_EXACT (k = n: the one subset of all responses), else over `draws`
    uniform draws of seed 0 (plumbing/votes.py). completions: [{"pred", "correct", "fork"}];
    ValueError unless 1 <= k <= n."""
    if not 1 <= k <= len(completions):
        raise ValueError(f"cons@{k} needs 1 <= k <= {len(completions)} responses")
    label = {id(c): g for g, members in enumerate(vote_groups(completions)) for c in members}
    forks = forks_in_tag_order(c["fork"] for c in completions)
    give = Counter(c["fork"] for c in in_turn(completions)[:k])
    # each token's responses sorted by content: equal keys are interchangeable (same group, same
    # grade), so no draw depends on the order in which the responses came
    by_fork = [sorted((c for c in completions if c["fork"] == f),
                      key=lambda c: (c["pred"] or "", bool(c["correct"]))) for f in forks]
    return votes.mean_vote([[label.get(id(c), -1) for c in mine] for mine in by_fork],  # -1: none
                           [[bool(c["correct"]) for c in mine] for mine in by_fork],
                           [give[f] for f in forks], draws)


# ----------------------------------------------------------------------------- metrics

def fair_split_counts(total, parts):
    """Responses per forking token in the authors' block order: 10 over 3 -> [4, 3, 3]."""
    base, rem = divmod(total, parts)
    return [base + (i < rem) for i in range(parts)]


def native_sets(completions, set_size, tag_order=None):
    """Native Cons@N sets, each using every forking token once. With >= 2 forking tokens, set j =
    the j-th response of each token, whatever the row order (for block order: the authors' {j +
    kS}). Without forks, tag_order "block" splits the n responses into `set_size` token blocks as
    the authors do and set j takes the j-th of each block; else consecutive blocks of `set_size`."""
    forks = forks_in_tag_order(c["fork"] for c in completions if c["fork"])
    if len(forks) >= 2:
        return [list(s) for s in zip(*[[c for c in completions if c["fork"] == f] for f in forks])]
    if tag_order == "block":
        counts = fair_split_counts(len(completions), set_size)
        starts = [sum(counts[:k]) for k in range(set_size)]
        return [[completions[start + j] for start in starts] for j in range(min(counts))]
    return [completions[i:i + set_size]
            for i in range(0, len(completions) - set_size + 1, set_size)]



def problem_metrics(completions, set_size, tag_order=None, ks=None, native=True, cons="expected"):
    """{metric: value} of one problem's responses; values in [0, 1]. cons@k for k in `ks` (default
    2, 4, 8, ... and n; cons_at_k, or cons_at_k_first with cons "first"), pass@k for every k in
    2..n, native_cons@N over native_sets unless `native` is false (responses whose tags the model
    chose: infer.py --fork auto)."""
    n, c = len(completions), sum(bool(x["correct"]) for x in completions)
    m = {"pass@1": c / n}
    for k in sorted(ks or {2 ** i for i in range(1, n.bit_length())} | {n}):
        vote = cons_at_k if cons == "expected" else cons_at_k_first
        m[f"cons@{k}"] = vote(completions, k)
    m.update({f"pass@{k}": pass_at_k(n, c, k) for k in range(2, n + 1)})
    sets = native_sets(completions, set_size, tag_order) if native else []
    if sets:
        m[f"native_cons@{len(sets[0])}"] = sum(majority_vote(s) for s in sets) / len(sets)
    return m


def aggregate(rows, set_size, cons="expected"):
    """Means over problems of problem_metrics, plus per_fork: each forking token's accuracy and
    mean length (Figure 5). The metrics are those of the problem with the most responses; each is
    averaged over the problems that have it (counts[metric]), the others are named on stderr."""
    # a row with fork_policy: the model chose its tags, so no native sets
    per_problem = [problem_metrics(r["completions"], set_size, r.get("tag_order"),
                                   native="fork_policy" not in r, cons=cons) for r in rows]
    evalfiles.warn_fewer_responses(rows)
    sizes = [len(r["completions"]) for r in rows]
    out, counts = {}, {}
    for k in per_problem[sizes.index(max(sizes))]:
        values = [m[k] for m in per_problem if k in m]
        out[k], counts[k] = sum(values) / len(values), len(values)
    responses = [c for r in rows for c in r["completions"]]
    forks = forks_in_tag_order(c["fork"] for c in responses)
    out.update(problems=len(rows), responses=len(responses), counts=counts,
               unparseable=sum(not c["pred"] for c in responses) / len(responses),
               per_fork=evalfiles.per_fork(responses, forks))
    return out


def score_rows(rows, path, set_size, out="", cons="expected"):
    """Metrics of `rows` (one per problem, graded by read_rows or grader.grade) with the grader's
    name, written to `out` (default: beside the rows file `path`) and printed; DataError for no
    rows."""
    if not rows:
        raise DataError(f"{path}: no rows to score")
    metrics = {**aggregate(rows, set_size, cons), "grader": grader_name(), "cons": cons}
    return evalfiles.report(metrics, rows, path, out)


# ----------------------------------------------------------------------------- main

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
    beside = cfg.rows.removesuffix(".jsonl") + ".metrics.json"
    if not cfg.out and any("layout" in r for r in rows):  # a labelled data file: under eval/
        beside = os.path.join("eval", os.path.basename(beside))
    out = cfg.out or beside
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    return score_rows(rows, cfg.rows, cfg.set_size, out, cfg.cons)


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
