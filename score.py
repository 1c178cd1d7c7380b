"""Answers and the paper's metrics: Pass@1, Cons@k, Pass@k and Pass@1 of Native Cons@N (Section 2.3).

Grading (`grade`). Each response's answer is extracted from its text (`extract_answer`) and compared
with the gold by math-verify, the grader of the paper's LightEval evaluation; where math-verify says
"not equal" or cannot parse, a built-in normalised comparison decides (`builtin_equal`: thousands
separators, \\$, \\text units, x= prefixes, trailing periods, numbers equal to 1e-6 relative).
math-verify's "equal" is not taken for clock times or answers whose words differ, which it reads as
ratios and units (4:30 = 2:15, 3 days = 3 hours). Answers are read in this order, the first stage
that finds one wins:
    1. the last \\boxed{...} or \\fbox{...} whose braces close (also "\\boxed 5"); an empty box is no answer
    2. the last "final answer is X", "the answer is X" or "answer: X"
    3. a last line "#### X" (GSM8K) or "A: X" (GSM8K's model solutions)
    4. for a numeric gold only, the last number of the response
Multiple-choice rows ("kind": "choice", e.g. GPQA-Diamond, gold a letter A-D) read a letter instead:
\\boxed{C}, "Answer: C" or "answer is (C)", or a last line that is just "C" or "(C)"; letters are
compared exactly. Scoring always re-grades from the text: stored pred/correct fields are rewritten.

Metrics (Table 1, Figures 4 and 5) are computed per problem and averaged over problems:
    pass@1         mean correctness of the n responses ("average of 32 generations")
    cons@k         majority vote of the first k responses, taken in turn over the forking tokens
                   (k = 2, 4, 8, ... and n; the same set under cycle and block order)
    pass@k         Chen et al. (2021)'s unbiased 1 - C(n-c, k) / C(n, k), for every k <= n (Figure 4)
    native_cons@N  sets of N responses, one per forking token, majority-voted and averaged over the
                   sets ("Pass@1 of Native Cons@6"; the paper's 11 sets of N = 6 take --samples 66)
    per_fork       accuracy and mean response length of each forking token (Figure 5)
Native sets: set j holds the j-th response of every forking token (each completion's "fork"), which
for the authors' block order ("tag_order": "block", token k gets responses kS..kS+S-1) is their set
{j + kS}, and for cycle order the j-th run of N. Without forks, a "block" row is split as the authors
split it (first tokens one more when N does not divide n); otherwise consecutive blocks of --set_size.
Votes: answers are grouped by `is_equiv`; the largest group wins, a tie goes to the group whose answer
appeared first, and a response without an answer never votes: a set with no answer counts as wrong.
A problem with fewer responses than the others is named in a warning, and each metric is averaged
over the problems that have enough responses (metrics["counts"][metric] = how many).

infer.py writes the rows and scores them with `score_rows`; any rows file (infer.py's, or one from vLLM
with only "gold" and each completion's "text" and "fork") is scored without a model by

    python score.py eval/aime24.all.jsonl --set_size 6   # prints the table, writes eval/aime24.all.metrics.json
"""
import functools
import importlib.metadata
import itertools
import math
import re
import sys
import threading
from dataclasses import dataclass

from math_verify import parse as mv_parse, verify as mv_verify

from common import DataError, parse_flags, read_jsonl, write_json

MV_TIMEOUT = 5  # seconds math-verify may spend on one parse or comparison (its SIGALRM timeout)


# ----------------------------------------------------------------------------- answers

def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} whose braces close ("\\boxed 5": the token after
    it), stripped; "" for an empty box; None without one. Linear time: one pass pairs the braces
    (escaped \\{ \\} do not count), so thousands of unclosed boxes cost no more than their length."""
    closing, stack = {}, []
    for m in re.finditer(r"\\.|[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            closing[stack.pop()] = m.start()
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*(\{|[^\s${}\\]+)", text))):
        if m.group(1) != "{":
            return m.group(1).rstrip(".,;")
        if m.start(1) in closing:
            return text[m.start(1) + 1:closing[m.start(1)]].strip()
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


ANSWER_IS = re.compile(r"(?i)(?:final answer|the answer)[\s*]*(?:is|:)[\s*:]*|\banswer[\s*]*:[\s*]*")
LETTER_IS = re.compile(r"(?i:answer)(?:[\s*]*(?i:is)[\s*:$]*|[\s*]*:[\s*$]*)\(?([A-D])\b\)?")
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def answer_phrase(text, start):
    """The answer that follows a marker at `start`: a $...$, \\(...\\) or \\[...\\] formula, else the rest
    of the sentence or clause ("7, which ..." -> "7"); None when that is empty or over 100 characters
    (prose, not an answer)."""
    rest = text[start:start + 300].split("\n", 1)[0]
    m = re.match(r"\s*(?:\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\])", rest)
    phrase = next(filter(None, m.groups())) if m else re.split(r"\.(?:\s|$)|,\s+(?=[a-z]{2})|\bI hope\b", rest, maxsplit=1)[0]
    phrase = phrase.strip(" *.")
    return phrase if 0 < len(phrase) <= 100 else None


def last_line_answer(text):
    """X of a last line "#### X" or "A: X", else None."""
    lines = text.rstrip().rsplit("\n", 1)
    m = re.fullmatch(r"\s*(?:####|A:)\s*(.+?)\s*", lines[-1])
    return m.group(1).rstrip(".") if m else None


def letter_of(s):
    """The choice letter A-D that `s` is ("C", "(c)", "\\text{C}", "C) 42 eV"), else None."""
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s).strip(" $*.")
    m = re.fullmatch(r"\(?([A-Da-d])\)?", s) or re.fullmatch(r"\(?([A-D])[).:]\s.*", s)
    return m.group(1).upper() if m else None


def extract_answer(text, gold=None, kind="math"):
    """The answer of a response, by the order in the module docstring, or None. kind "choice" reads a
    letter A-D; kind "math" reads a formula, and its last stage (the last number) only for a numeric
    `gold`. A last box that is empty ends the search: it is no answer, never a vote."""
    boxed = last_boxed(text)
    if kind == "choice":
        if boxed == "":
            return None
        if boxed and letter_of(boxed):
            return letter_of(boxed)
        m = None
        for m in LETTER_IS.finditer(text):
            pass
        if m:
            return m.group(1)
        last = text.rstrip().rsplit("\n", 1)[-1]
        return letter_of(last) if re.fullmatch(r"[\s*$]*\(?[A-Da-d]\)?[\s*$.]*", last) else None
    if boxed is not None:
        return boxed or None
    for m in reversed(list(ANSWER_IS.finditer(text))):
        phrase = answer_phrase(text, m.end())
        if phrase:
            return phrase
    line = last_line_answer(text)
    if line:
        return line
    if gold is not None and as_number(normalise(gold)) is not None:
        m = None
        for m in NUMBER.finditer(text):
            pass
        return m.group() if m else None
    return None


# ----------------------------------------------------------------------------- grading

def split_unit(s):
    """(answer, unit) of an answer that ends in a \\text{} or \\mbox{} unit after a number, such as
    "5\\text{ cm}" -> ("5", "cm"); a unit is letters and spaces only (so "p.m." is not one)."""
    m = re.fullmatch(r"(.*\d)\s*\\(?:text|mbox|mathrm)\{\s*([A-Za-z][A-Za-z ]*?)\s*\}(\^\{?\d\}?)?\s*\.?", s.strip())
    return (m.group(1), m.group(2) + (m.group(3) or "")) if m else (s, "")


def normalise(s):
    """A canonical string for the built-in comparison: no spaces, $ or \\$, \\left/\\right, \\text{} or
    \\mbox{} wrappers, degree or percent signs, thousands separators (1,000,000 and 10{,}000), x=
    prefix or trailing period; \\dfrac and \\tfrac read as \\frac, \\sqrt2 as \\sqrt{2}, \\frac12 as
    \\frac{1}{2}."""
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}", r"\1", str(s))
    for a, b in (("\\$", ""), ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""),
                 ("\\ ", ""), ("{,}", ","), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""),
                 ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("$", ""), (" ", "")):
        s = s.replace(a, b)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    if s.count("=") == 1:
        s = re.sub(r"^[a-zA-Z]=", "", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?\.?", s):
        s = s.replace(",", "")
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


def builtin_equal(pred, ref):
    """Normalised strings equal, or numbers equal to 1e-6 relative; answers whose units differ
    ("3\\text{ days}", "3\\text{ hours}") are unequal, a unit on one side only is dropped."""
    (pred, unit_a), (ref, unit_b) = split_unit(pred), split_unit(ref)
    if unit_a and unit_b and unit_a.strip().lower() != unit_b.strip().lower():
        return False
    a, b = normalise(pred), normalise(ref)
    x, y = as_number(a), as_number(b)
    return bool(a) and (a == b or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6)))


def mv_timeout():
    """math-verify's timeout uses SIGALRM, which only the main thread may set: elsewhere, none."""
    return MV_TIMEOUT if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=65536)
def mv_parsed(answer):
    """math-verify's parse of an extracted answer, as its boxed content; [] if it cannot parse."""
    try:
        return mv_parse(f"\\boxed{{{answer}}}", parsing_timeout=mv_timeout())
    except Exception:  # math-verify raises on a timeout outside the main thread and on odd input
        return []


@functools.lru_cache(maxsize=65536)
def mv_equal(pred, ref):
    """math-verify's verdict: True, or False where it says "not equal" or cannot parse either side.
    Cached, as votes compare the same answers many times."""
    gold, target = mv_parsed(ref), mv_parsed(pred)
    try:
        return bool(gold and target and mv_verify(gold, target, timeout_seconds=mv_timeout()))
    except Exception:  # as in mv_parsed
        return False


def words(s):
    """Lower-case words of an answer: any inside \\text{} or \\mbox{}, two or more letters elsewhere,
    LaTeX commands (\\frac) excluded; dots dropped, so "p.m." is "pm"."""
    wrapped = r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}"
    found = re.findall(r"[a-zA-Z]+", " ".join(re.findall(wrapped, s)).replace(".", ""))
    found += re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}", re.sub(wrapped, " ", s).replace(".", ""))
    return {w.lower() for w in found}


def mv_applies(pred, ref):
    """Whether math-verify's "equal" may be trusted for this pair: not for a clock time (it reads
    4:30 as the ratio 2/15, so 2:15 = 4:30), nor for answers whose words differ (it drops words as
    units: 3 days = 3 hours, 4:30 a.m. = 4:30 p.m.), nor for a runaway answer over 1,000 characters."""
    if re.search(r"\d:\d\d", pred + " " + ref) or max(len(pred), len(ref)) > 1000:
        return False
    a, b = words(pred), words(ref)
    return not (a and b and a != b)


def is_equiv(pred, ref):
    """Whether answer `pred` equals `ref`: math-verify first (where `mv_applies`); where it says "not
    equal" or cannot parse, the built-in comparison decides. The one test behind every metric, votes
    included. Setting `score.mv_verify = None` grades with the built-in comparison alone."""
    if not pred or not ref:
        return False
    return (mv_verify is not None and mv_applies(pred, ref) and mv_equal(pred, ref)) or builtin_equal(pred, ref)


def grade(text, gold, kind="math"):
    """(pred, correct) of one response: its extracted answer (None if it has none) and whether that
    equals the gold answer (a gold field is read by gold_answer; letters compared exactly for kind
    "choice")."""
    gold = gold_answer(gold)
    pred = extract_answer(text, gold, kind)
    if kind == "choice":
        return pred, pred is not None and pred == letter_of(str(gold))
    return pred, is_equiv(pred, gold)


def grader_name():
    """Which grader scores, for the metrics file: e.g. "math-verify 0.9.0 + built-in fallback"."""
    if mv_verify is None:
        return "built-in"
    return f"math-verify {importlib.metadata.version('math-verify')} + built-in fallback"


# ----------------------------------------------------------------------------- metrics

def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(completions):
    """Whether the majority answer of `completions` ([{"pred", "correct"}]) is correct. Groups are
    formed in order of first appearance, so max() (first of the largest) breaks ties toward the
    earliest answer; responses without an answer (None or "") do not vote, and no vote is wrong."""
    groups = []  # [answer, votes, correct]
    for c in completions:
        if not c["pred"]:
            continue
        for g in groups:
            if is_equiv(c["pred"], g[0]):
                g[1] += 1
                break
        else:
            groups.append([c["pred"], 1, bool(c["correct"])])
    return max(groups, key=lambda g: g[1])[2] if groups else False


def fair_split_counts(total, parts):
    """Responses per forking token in the authors' block order: 10 over 3 -> [4, 3, 3]."""
    base, rem = divmod(total, parts)
    return [base + (i < rem) for i in range(parts)]


def native_sets(completions, set_size, tag_order=None):
    """Native Cons@N sets, each using every forking token once. With >= 2 forking tokens, set j = the
    j-th response of each token, whatever the row order (for block order: the authors' {j + kS}).
    Without forks, tag_order "block" splits the n responses into `set_size` token blocks as the
    authors do and set j takes the j-th of each block; else consecutive blocks of `set_size`."""
    forks = list(dict.fromkeys(c["fork"] for c in completions if c["fork"]))
    if len(forks) >= 2:
        return [list(s) for s in zip(*[[c for c in completions if c["fork"] == f] for f in forks])]
    if tag_order == "block":
        counts = fair_split_counts(len(completions), set_size)
        starts = [sum(counts[:k]) for k in range(set_size)]
        return [[completions[start + j] for start in starts] for j in range(min(counts))]
    return [completions[i:i + set_size] for i in range(0, len(completions) - set_size + 1, set_size)]


def in_turn(completions):
    """The responses one forking token at a time: the first of each token, then the second of each,
    ... Cycle order stays as it is and block order is interleaved, so that cons@k votes over the
    same mix of tokens whatever the order (the authors' maj_sot@k)."""
    forks = list(dict.fromkeys(c["fork"] for c in completions))
    if len(forks) < 2:
        return completions
    by_fork = [[c for c in completions if c["fork"] == f] for f in forks]
    return [c for turn in itertools.zip_longest(*by_fork) for c in turn if c is not None]


def problem_metrics(completions, set_size, tag_order=None):
    """{metric: value} of one problem's responses; values in [0, 1]. cons@k votes over the first k
    responses taken in turn over the forking tokens (in_turn)."""
    n, c = len(completions), sum(bool(x["correct"]) for x in completions)
    m, turns = {"pass@1": c / n}, in_turn(completions)
    for k in sorted({2 ** i for i in range(1, n.bit_length())} | {n}):
        m[f"cons@{k}"] = float(majority_vote(turns[:k]))
    m.update({f"pass@{k}": pass_at_k(n, c, k) for k in range(2, n + 1)})
    sets = native_sets(completions, set_size, tag_order)
    if sets:
        m[f"native_cons@{len(sets[0])}"] = sum(majority_vote(s) for s in sets) / len(sets)
    return m


def aggregate(rows, set_size):
    """Means over problems, plus per-fork accuracy and length. The metrics are those of the problem
    with the most responses; each is averaged over the problems that have it (counts[metric]), and
    problems with fewer responses are named in a warning on stderr."""
    per_problem = [problem_metrics(r["completions"], set_size, r.get("tag_order")) for r in rows]
    sizes = [len(r["completions"]) for r in rows]
    short = [str(r.get("id", i)) for i, (r, n) in enumerate(zip(rows, sizes)) if n < max(sizes)]
    if short:
        print(f"warning: {len(short)} of {len(rows)} problems have fewer than {max(sizes)} responses "
              f"({', '.join(short[:10])}{', ...' if len(short) > 10 else ''}); each metric is averaged over "
              "the problems that have enough responses (see counts)", file=sys.stderr)
    out, counts = {}, {}
    for k in per_problem[sizes.index(max(sizes))]:
        values = [m[k] for m in per_problem if k in m]
        out[k], counts[k] = sum(values) / len(values), len(values)
    responses = [c for r in rows for c in r["completions"]]
    out.update(problems=len(rows), responses=len(responses), counts=counts,
               unparseable=sum(not c["pred"] for c in responses) / len(responses))
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
          f"{100 * metrics['unparseable']:.1f}% without an answer, graded by {metrics.get('grader', '?')}")
    n = max(int(k[5:]) for k in metrics if k.startswith("pass@"))
    shown = [k for k in metrics if k == "pass@1" or k.startswith(("cons@", "native_cons@"))
             or k.startswith("pass@") and int(k[5:]) in {2 ** i for i in range(n.bit_length())} | {n}]
    counts = metrics.get("counts", {})
    for k in shown:
        over = f"  (over {counts[k]} problems)" if counts.get(k, metrics["problems"]) < metrics["problems"] else ""
        print(f"  {k:<16} {100 * metrics[k]:6.2f}{over}")
    for fork, s in metrics["per_fork"].items():
        length = ", ".join(f"{k[5:]} {v:.0f}" for k, v in s.items() if k.startswith("mean_"))
        print(f"  {fork:<16} {100 * s['accuracy']:6.2f}  ({s['responses']} responses, mean {length})")


# ----------------------------------------------------------------------------- rows files

def read_rows(path):
    """Rows of an output file, each completion graded afresh from its text and the row's gold (any
    stored pred and correct are rewritten), so a file scored twice gives one answer. DataError
    naming the line for a malformed row, an empty gold, a duplicate id or an unknown kind."""
    rows, seen = [], {}
    for n, row in read_jsonl(path, drop_truncated_tail=True):
        if not isinstance(row, dict) or "gold" not in row or not isinstance(row.get("completions"), list) \
                or not row["completions"] or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                     for c in row["completions"]):
            raise DataError(f"{path}:{n}: a row needs 'gold' and 'completions': [{{'text', ...}}, ...]")
        if "id" in row:
            if row["id"] in seen:
                raise DataError(f"{path}:{n}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
            seen[row["id"]] = n
        kind = row.get("kind") or "math"
        if kind not in ("math", "choice"):
            raise DataError(f"{path}:{n}: unknown kind {kind!r} (math or choice)")
        gold = gold_answer(row["gold"]) if row["gold"] is not None else ""
        if not gold:
            raise DataError(f"{path}:{n}: the gold answer is empty")
        if kind == "choice" and not letter_of(gold):
            raise DataError(f"{path}:{n}: a choice row needs a gold letter A-D, got {row['gold']!r}")
        for c in row["completions"]:
            c.setdefault("fork", None)
            c["pred"], c["correct"] = grade(c["text"], gold, kind)
        rows.append(row)
    return rows


def score_rows(rows, path, set_size):
    """Metrics of `rows` (one per problem, graded by read_rows or grade), with the grader's name,
    written beside the rows file `path` and printed."""
    if not rows:
        raise DataError(f"{path}: no rows to score")
    metrics = {**aggregate(rows, set_size), "grader": grader_name()}
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
