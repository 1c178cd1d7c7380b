"""Grading one response: its answer (answers.py) and whether it equals the gold (`is_equiv`).

score.py counts these verdicts into the paper's metrics (Section 2.3); infer.py and `data.py mix`
grade with them too. math-verify, the grader of the paper's LightEval evaluation, decides, within
limits; where it says "not equal" the built-in comparison (values.py) may still accept. Two exact
numbers (integers, decimals, repeating decimals, fractions) never reach it: they are compared
exactly, so 1,000,001 is never 1,000,000. Its "equal" is checked without its rounding, for bare
numbers and for every entry of an interval, tuple, vector, matrix or set (0.333333 is not 1/3, nor
(0.333333, 1) (1/3, 1)), and is not taken for clock times, answers whose words, units or `v=` letters
differ, base-n answers (it drops the subscript of 52_9), digits split by a space ("1 2") or a runaway
answer of over 1,000 characters. Every rule, how unfinished responses are graded, and where this
differs from LightEval's reading: docs/grading.md.

math-verify runs in a worker process that is killed after WORKER_LIMIT seconds, so no grade can hang,
whatever thread calls it.

    python -m pytest -q tests/test_grader.py tests/test_answers.py
"""
import atexit
import functools
import importlib.metadata
import json
import os
import re
import select
import subprocess
import sys
import threading

if __package__ in (None, ""):  # the worker runs this file as a script: make `plumbing` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from plumbing import answers
# callers' names, kept here: grader.gold_answer, grader.letter_of, grader.builtin_equal, ...
from plumbing.answers import boxed_spans, gold_answer, last_boxed, letter_of, read_gold  # noqa: F401
from plumbing.values import (MINUS, WRAPPED, builtin_equal, exact_values, normalise,  # noqa: F401
                             prefixes_clash, split_base, strip_math)

MV_TIMEOUT = 5  # seconds math-verify may spend on one parse or comparison (its own timeout, in the worker)
WORKER_LIMIT = 15  # seconds before the worker is killed and the comparison counts as math-verify "not equal"
use_math_verify = True  # False: the built-in comparison alone (tests, and `grader_name` says so)


# ----------------------------------------------------------------------------- math-verify

def words(s):
    """Lower-case words of an answer: any inside \\text{} or \\mbox{}, two or more letters elsewhere,
    LaTeX commands (\\frac) excluded; dots dropped, so "p.m." is "pm"."""
    found = re.findall(r"[a-zA-Z]+", " ".join(re.findall(WRAPPED, s)).replace(".", ""))
    found += re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}", re.sub(WRAPPED, " ", s).replace(".", ""))
    return {w.lower() for w in found}


def mv_applies(pred, ref):
    """Whether math-verify's "equal" may be trusted for this pair (the limits in the module docstring)."""
    if any(re.search(r"\d:\d\d", s) or re.search(r"\d\s+\d", normalise(s)) or len(s) > 1000
           or split_base(normalise(s))[1] for s in (pred, ref)):
        return False
    a, b = words(pred), words(ref)
    return not (a and b and a != b) and not prefixes_clash(normalise(pred), normalise(ref))


def entries(e):
    """The numbers a parsed answer holds, in order: [e] for a number (the right side of "x = 1/3"), the
    entries of a tuple, vector, matrix or union, the ends of an interval, a set's elements by value;
    None for anything else (an expression with symbols)."""
    from sympy import Eq, FiniteSet, Interval, Tuple, Union
    from sympy.matrices import MatrixBase
    e = e.rhs if isinstance(e, Eq) and e.lhs.is_Symbol else e
    if getattr(e, "is_number", False) and not isinstance(e, (Tuple, Interval, FiniteSet, MatrixBase)):
        return [e]
    if isinstance(e, MatrixBase):
        items = list(e)
    elif isinstance(e, Interval):
        items = [e.start, e.end]
    elif isinstance(e, FiniteSet):
        items = sorted(e.args, key=lambda x: float(x)) if all(x.is_real and x.is_number for x in e.args) else None
    elif isinstance(e, (Tuple, Union)):
        items = list(e.args)
    elif isinstance(e, (tuple, list)):
        items = list(e)
    else:
        items = None
    flat = [entries(x) for x in items] if items is not None else [None]
    return None if any(f is None for f in flat) else [x for f in flat for x in f]


def numbers_agree(g, t):
    """Whether two sympy numbers are one value: rational ones (decimals as written) exactly, irrational
    ones to 40 digits, a decimal and an irrational to 1e-6 relative (its rounding)."""
    from sympy import Float, Rational
    decimals = bool(g.atoms(Float) or t.atoms(Float))
    g, t = (e.xreplace({f: Rational(str(f)) for f in e.atoms(Float)}) for e in (g, t))
    tolerance = 1e-40 if g.is_rational and t.is_rational or not decimals else 1e-6
    difference, scale = abs((g - t).evalf(60)), max(abs(g.evalf(60)), abs(t.evalf(60)))
    return bool(difference <= scale * tolerance)


def mv_verdict(pred, ref, timeout):
    """math-verify's verdict on `pred` against `ref` (each parsed as the content of a box), with its
    "equal" checked without its rounding and chopping of small differences (1/2^98 = 1/2^99, 0.333333 =
    1/3) by `numbers_agree`, for two numbers and entry by entry for two containers of numbers (an
    interval, tuple, vector, matrix or set). Runs in the worker."""
    from math_verify import parse, verify
    gold, target = (parse(f"\\boxed{{{s}}}", parsing_timeout=timeout) for s in (ref, pred))
    if not (gold and target and verify(gold, target, timeout_seconds=timeout)):
        return False
    try:
        g, t = entries(gold[0]), entries(target[0])
        if g is None or t is None or len(g) != len(t):
            return True  # expressions with symbols, or shapes math-verify matched otherwise: its verdict stands
        return all(numbers_agree(a, b) for a, b in zip(g, t))
    except (AttributeError, TypeError, ValueError):  # not sympy numbers: math-verify's verdict stands
        return True


def worker_main():
    """The worker's loop: one JSON [pred, ref, timeout] per line in, one JSON verdict per line out."""
    for line in sys.stdin:
        pred, ref, timeout = json.loads(line)
        try:
            verdict = mv_verdict(pred, ref, timeout)
        except Exception:  # math-verify raises on odd input and on its own timeout: "not equal"
            verdict = False
        print(json.dumps(verdict), flush=True)


_worker, _owner, _lock = None, None, threading.Lock()


def ask_worker(pred, ref):
    """math-verify's verdict from the worker process; a worker that does not answer within
    WORKER_LIMIT seconds is killed (a fresh one starts on the next call) and the verdict is False.
    One worker per process (a forked child starts its own), its calls serialised by a lock."""
    global _worker, _owner
    with _lock:
        if _worker is None or _worker.poll() is not None or _owner != os.getpid():
            _owner = os.getpid()
            _worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            _worker.stdin.write(json.dumps([pred, ref, MV_TIMEOUT]) + "\n")
            _worker.stdin.flush()
            if select.select([_worker.stdout], [], [], WORKER_LIMIT)[0]:
                line = _worker.stdout.readline()
                if line:
                    return json.loads(line)
        except (OSError, ValueError):
            pass
        _worker.kill()
        _worker.wait()
        _worker = None
        return False


@atexit.register
def stop_worker():
    if _worker is not None and _owner == os.getpid() and _worker.poll() is None:
        _worker.kill()


@functools.lru_cache(maxsize=65536)
def mv_equal(pred, ref):
    """math-verify's verdict: True, or False where it says "not equal", cannot parse or runs out of
    time. Cached, as votes compare the same answers many times."""
    return ask_worker(pred, ref)


# ----------------------------------------------------------------------------- verdicts

def is_equiv(pred, ref):
    """Whether answer `pred` equals `ref`: two exact numbers by value; otherwise math-verify (where
    `mv_applies`), and where it says "not equal" the built-in comparison."""
    if not pred or not ref:
        return False
    pred, ref = str(pred).replace(MINUS, "-"), str(ref).replace(MINUS, "-")
    if exact_values(normalise(pred)) is not None and exact_values(normalise(ref)) is not None:
        return builtin_equal(pred, ref)
    return use_math_verify and mv_applies(pred, ref) and mv_equal(pred, ref) or builtin_equal(pred, ref)


def same_answer(a, b):
    """One vote for two answers: is_equiv in a fixed order of the pair, so symmetric."""
    return is_equiv(*sorted((a, b)))


def extract_answer(text, gold=None, kind="math", finished=True, question=None):
    """The answer of a response (answers.extract_answer), two of its answers being one when
    `same_answer` says so; None when it has none."""
    return answers.extract_answer(text, gold, kind, finished, question, same=same_answer)


def grade(text, gold, kind="math", finished=True, question=None):
    """(pred, correct) of one response: its extracted answer (None if it has none) and whether that
    equals the gold answer (a gold field is read by gold_answer; letters compared exactly for kind
    "choice"). finished: False for a response cut at --max_new_tokens (read only after a `</think>`,
    docs/grading.md); question: the problem's text, so that a number only copied from it is no answer."""
    gold = gold_answer(gold)
    pred = extract_answer(text, gold, kind, finished, question)
    if kind == "choice":
        return pred, pred is not None and pred == letter_of(str(gold))
    return pred, is_equiv(pred, gold)


def grader_name():
    """Which grader scores, for the metrics file: e.g. "math-verify 0.9.0 + built-in fallback"."""
    if not use_math_verify:
        return "built-in"
    return f"math-verify {importlib.metadata.version('math-verify')} + built-in fallback"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
