"""Grading one response: its answer (`extract_answer`) and whether it equals the gold (`is_equiv`).

score.py counts these verdicts into the paper's metrics (Section 2.3); infer.py and `data.py mix`
grade with them too. math-verify, the grader of the paper's LightEval evaluation, decides, within
limits. Two exact numbers (integers, decimals, fractions) never reach it: they are compared exactly,
so 1,000,001 is never 1,000,000. Its "equal" for two other numbers is checked without its chopping
of small differences (1/2^98 is not 1/2^99), and is not taken for clock times (it reads 4:30 as
2/15), answers whose words or `v=` letters differ (3 days, 3 hours; y=3, x=3), digits split by a
space ("1 2", which it reads as 3), or a runaway answer of over 1,000 characters. Its "not equal" is
overturned only by these built-in normalisations (`builtin_equal`), each a reason to accept:
    format     $, \\$, \\left/\\right, spaces (never between two digits), \\dfrac -> \\frac, \\frac12 ->
               \\frac{1}{2}, \\sqrt2 -> \\sqrt{2}, \\text{} around words, degrees, a trailing period
    numbers    thousands separators only in proper groups of three (1,000,000; 10{,}000; 6\\,290\\,000),
               then exact values; p\\% is p/100, or p itself when p is a whole number (math-verify's rule)
    units      a \\text{} unit after a number on one side only is dropped (5\\text{ cm} = 5); two differ
    prefix     a one-letter `v=` on one side only is dropped (x=5 = 5) unless v recurs in the rest
math-verify runs in a worker process that is killed after WORKER_LIMIT seconds, so no grade can hang,
whatever thread calls it. Answers are read in this order, the first stage that finds one wins:
    1. the last \\boxed{...} or \\fbox{...} whose braces close (also "\\boxed 5"); an empty box is no
       answer. When the gold has several parts ("3, 5"), the last box and those before it that a few
       words join ("x = \\boxed{3} and x = \\boxed{5}" -> "3, 5") are read together, as LightEval does
    2. the last "final answer is X", "the answer is X" or "answer: X" (math delimiters stripped)
    3. a last line "#### X" (GSM8K) or "A: X" (GSM8K's model solutions)
    4. for a numeric gold only, the last number standing alone (not inside a word or a pair of braces)
Multiple-choice rows ("kind": "choice", gold a letter A-D) read a letter: \\boxed{C}, "Answer: C" or
"answer is (C)", or a last line that is just "C" or "(C)"; letters are compared exactly. Where this
differs from math-verify and LightEval, and how their own test cases fare: docs/reproducing.md.

    python -m pytest -q test_grader.py   # the families of right and wrong answers, the worker's timeout
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
from fractions import Fraction

MV_TIMEOUT = 5  # seconds math-verify may spend on one parse or comparison (its own timeout, in the worker)
WORKER_LIMIT = 15  # seconds before the worker is killed and the comparison counts as math-verify "not equal"
use_math_verify = True  # False: the built-in comparison alone (tests, and `grader_name` says so)


# ----------------------------------------------------------------------------- answers

def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} whose braces close ("\\boxed 5": the token after
    it), stripped; "" for an empty box; None without one. Linear time."""
    boxes = boxed_spans(text)
    return boxes[-1][2] if boxes else None


def boxed_spans(text):
    """[(start, end, content)] of every closed \\boxed{} / \\fbox{} (or "\\boxed 5"), in order. One pass
    pairs the braces (escaped \\{ \\} do not count), so unclosed boxes cost no more than their length."""
    closing, stack, spans = {}, [], []
    for m in re.finditer(r"\\.|[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif m.group() == "}" and stack:
            closing[stack.pop()] = m.start()
    for m in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*(\{|[^\s${}\\]+)", text):
        if m.group(1) != "{":
            spans.append((m.start(), m.end(), m.group(1).rstrip(".,;")))
        elif m.start(1) in closing:
            spans.append((m.start(), closing[m.start(1)] + 1, text[m.start(1) + 1:closing[m.start(1)]].strip()))
    return spans


def last_box_group(text):
    """The contents of the last box and of the boxes before it that are joined to the next by a few
    words at most ("x = \\boxed{3} and x = \\boxed{5}", "\\boxed{1}, \\boxed{2}"): a multi-part answer."""
    spans = boxed_spans(text)
    group = spans[-1:]
    for before in reversed(spans[:-1]):
        between = re.sub(WRAPPED, r" \1 ", text[before[1]:group[0][0]])
        if "\n\n" in between or len(re.findall(r"(?<!\\)\b[a-zA-Z]+", between)) > 4:
            break
        group.insert(0, before)
    return [c for _, _, c in group if c]


def strip_math(s):
    """s without one pair of math delimiters around all of it: $x$, $$x$$, \\(x\\), \\[x\\]."""
    m = re.fullmatch(r"\s*(?:\$\$(.+)\$\$|\$(.+)\$|\\\((.+)\\\)|\\\[(.+)\\\])\s*", s, re.S)
    inner = next(filter(None, m.groups())) if m else s
    return s.strip() if "$" in inner else inner.strip()  # "$a$ and $b$" is not one formula


def gold_answer(answer):
    """The final answer of a gold field (`read_gold`), or all of it where none can be read."""
    return read_gold(answer) or strip_math(str(answer).strip())


def read_gold(answer):
    """The final answer of a gold field: a last line `#### n` (GSM8K) or `A: n` (its model solutions),
    else its box(es) (parts a few words apart are read together); in a worked solution (sentences with
    two words outside math: "Since $x^2 = 49$ and $x>0$, $x = 7$.") its answer phrase or last standalone
    number ("7"), None if it has neither; else the answer itself, delimiters stripped."""
    answer = str(answer).strip()
    last = answer.rsplit("\n", 1)[-1]
    for mark in ("####", "A:"):
        if last.startswith(mark):
            return last[len(mark):].strip().replace(",", "")
    boxes = last_box_group(answer)
    if boxes:
        return ", ".join(boxes)
    outside = re.sub(r"\$\$.+?\$\$|\$.+?\$|\\\(.+?\\\)|\\\[.+?\\\]|\\[a-zA-Z]+(?:\{[^{}]*\})?", " ", answer, flags=re.S)
    sentences = answer.endswith(".") or "\n" in answer or len(answer) > 80
    if sentences and len(re.findall(r"\b[a-zA-Z]{2,}\b", outside)) >= 2:
        return extract_answer(answer, gold="0")
    return strip_math(answer) or None


ANSWER_IS = re.compile(r"(?i)(?:final answer|the answer)[\s*]*(?:is|:)[\s*:}]*|\banswer[\s*]*:[\s*}]*")  # } of \text{Answer:}
LETTER_IS = re.compile(r"(?i:answer)(?:[\s*]*(?i:is)[\s*:$]*|[\s*]*:[\s*$]*)\(?([A-D])\b\)?")
NUMBER = re.compile(r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
DELIMITERS = r"\$\$|\$|\\\(|\\\)|\\\[|\\\]"


def answer_phrase(text, start):
    """The answer that follows a marker at `start`: a $...$, \\(...\\) or \\[...\\] formula, else the rest
    of the sentence or clause ("7, which ..." -> "7"), without math delimiters around it
    ("\\[Answer: 009\\]" -> "009"); None when that is empty or over 100 characters (prose)."""
    rest = text[start:start + 300].split("\n", 1)[0]
    m = re.match(r"\s*(?:\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\])", rest)
    phrase = next(filter(None, m.groups())) if m else re.split(r"\.(?:\s|$)|,\s+(?=[a-z]{2})|\bI hope\b", rest, maxsplit=1)[0]
    phrase = re.sub(rf"^(?:\s|{DELIMITERS})+|(?:\s|{DELIMITERS})+$", "", phrase.strip(" *.")).strip(" *.")
    return phrase if 0 < len(phrase) <= 100 else None


def last_line_answer(text):
    """X of a last line "#### X" or "A: X", else None."""
    m = re.fullmatch(r"\s*(?:####|A:)\s*(.+?)\s*", text.rstrip().rsplit("\n", 1)[-1])
    return m.group(1).rstrip(".") if m else None


def last_number(text):
    """The last number that stands alone: not inside a word ("H2O"), next to a letter, ^, _ or \\, nor
    inside a pair of braces (the 2 of "\\frac{1+\\sqrt{5}}{2}"), with its minus sign; None without one."""
    inside, stack = [0] * (len(text) + 1), []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            start = stack.pop()
            inside[start] += 1
            inside[m.start() + 1] -= 1
    depth, outside = 0, []
    for ch, step in zip(text, inside):  # the text with everything inside closed braces blanked out
        depth += step
        outside.append(" " if depth else ch)
    for m in reversed(list(NUMBER.finditer("".join(outside)))):
        before, after = text[max(0, m.start() - 2):m.start()], text[m.end():m.end() + 2]
        if not re.search(r"[\w\\^_.,]$", before) and not re.match(r"[A-Za-z\d^_]|[.,]\d", after):
            return ("-" if re.fullmatch(r"(?:^|.?[\s(=$])-", before) else "") + m.group()
    return None


def letter_of(s):
    """The choice letter A-D that `s` is ("C", "(c)", "\\text{C}", "C) 42 eV"), else None."""
    s = re.sub(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}", r"\1", s).strip(" $*.")
    m = re.fullmatch(r"\(?([A-Da-d])\)?", s) or re.fullmatch(r"\(?([A-D])[).:]\s.*", s)
    return m.group(1).upper() if m else None


def parts(s):
    """How many top-level comma- or semicolon-separated parts an answer has: "3, 5" and "\\{3, 5\\}" 2,
    "(3, 5)" and "58,500" 1."""
    s = re.sub(r"\d{1,3}(?:(?:,|\{,\})\d{3})+(?!\d)", "0", strip_math(str(s)).replace("\\{", "{").replace("\\}", "}"))
    s = s[1:-1] if s.startswith("{") and s.endswith("}") else s  # a set {1, 2, 3}: its elements
    depth, count = 0, 1
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        count += depth == 0 and ch in ",;"
    return count


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
        several = last_box_group(text) if boxed and gold is not None and parts(gold) > 1 else []
        return ", ".join(several) if len(several) > 1 else strip_math(boxed) or None
    for m in reversed(list(ANSWER_IS.finditer(text))):
        phrase = answer_phrase(text, m.end())
        if phrase:
            return phrase
    line = last_line_answer(text)
    if line:
        return line
    if gold is not None and exact_values(normalise(gold)) is not None:
        return last_number(text)
    return None


# ----------------------------------------------------------------------------- the built-in comparison

WRAPPED = r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}"


def normalise(s):
    """The canonical string of an answer for the built-in comparison (the "format" rule)."""
    s = strip_math(str(s))
    s = re.sub(WRAPPED, r"\1", s)
    for a, b in (("\\$", ""), ("\\left", ""), ("\\right", ""), ("\\!", ""), ("{,}", ","), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("\\cfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""), ("$", "")):
        s = s.replace(a, b)
    s = re.sub(r"(?<=\d)\\,(?=\d{3}(?!\d))", ",", s)  # a thin space between groups of three: a separator
    s = re.sub(r"\\[,;:> ]|~|\\q?quad", " ", s)
    s = re.sub(r"\s+", lambda m: " " if re.match(r"\d", s[m.end():m.end() + 1]) and re.search(r"[\d,]$", s[:m.start()]) else "", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    return s.rstrip(".")


DECIMAL = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"


def exact_values(s):
    """The values a normalised answer may mean, as exact fractions: {Fraction} for an integer, decimal
    or fraction ("1,000,000", "0.50", "-\\frac{3}{4}", "3/4"); for p\\% {p/100, p} when p is whole, else
    {p/100}; None for anything else (a thousands separator outside a proper group of three is none)."""
    percent = re.fullmatch(r"(.+?)\\?%", s)
    if percent:
        values = exact_values(percent.group(1))
        if values is None or len(values) != 1:
            return None
        (p,) = values
        return frozenset({p / 100} | ({p} if p.denominator == 1 else set()))
    m = re.fullmatch(rf"([-+]?)\\frac\{{({DECIMAL})\}}\{{({DECIMAL})\}}|()({DECIMAL})/({DECIMAL})|()({DECIMAL})", s)
    if not m or not re.search(r"\d", s):
        return None
    sign, *numbers = [g for g in m.groups() if g is not None]
    try:
        value = Fraction(numbers[0].replace(",", "")) / (Fraction(numbers[1].replace(",", "")) if len(numbers) > 1 else 1)
    except (ValueError, ZeroDivisionError):
        return None
    return frozenset({-value if sign == "-" else value})


def split_unit(s):
    """(answer, unit) of an answer that ends in a \\text{} or \\mbox{} unit after a number, such as
    "5\\text{ cm}" -> ("5", "cm"); a unit is letters and spaces only (so "p.m." is not one)."""
    m = re.fullmatch(r"(.*\d)\s*\\(?:text|mbox|mathrm)\{\s*([A-Za-z][A-Za-z ]*?)\s*\}(\^\{?\d\}?)?\s*\.?", s.strip())
    return (m.group(1), m.group(2) + (m.group(3) or "")) if m else (s, "")


def split_prefix(s):
    """(letter, rest) of a normalised "v=rest" with one letter v and one "=", else (None, s)."""
    m = re.fullmatch(r"([a-zA-Z])=([^=]+)", s)
    return (m.group(1), m.group(2)) if m else (None, s)


def prefixes_clash(a, b):
    """Whether the `v=` prefixes of two normalised answers forbid calling them equal: both have one,
    with different letters (y=3, x=3), or one has one whose letter recurs after it (x=2x+1 is an
    equation, not the value 2x+1)."""
    (va, ra), (vb, rb) = split_prefix(a), split_prefix(b)
    if va and vb:
        return va != vb
    v, rest = (va, ra) if va else (vb, rb)
    return bool(v) and re.search(rf"(?<![\\a-zA-Z]){v}(?![a-zA-Z])", rest) is not None


def builtin_equal(pred, ref):
    """Whether the normalisations of the module docstring make `pred` and `ref` one answer. Symmetric;
    two exact numbers are equal only when some value of one is a value of the other."""
    (pred, unit_a), (ref, unit_b) = split_unit(strip_math(str(pred))), split_unit(strip_math(str(ref)))
    if unit_a and unit_b and unit_a.strip().lower() != unit_b.strip().lower():
        return False
    a, b = normalise(pred), normalise(ref)
    if prefixes_clash(a, b):
        return False
    a, b = split_prefix(a)[1], split_prefix(b)[1]
    x, y = exact_values(a), exact_values(b)
    if x is not None or y is not None:
        return x is not None and y is not None and bool(x & y)
    return bool(a) and a.replace(", ", ",") == b.replace(", ", ",")


# ----------------------------------------------------------------------------- math-verify

def words(s):
    """Lower-case words of an answer: any inside \\text{} or \\mbox{}, two or more letters elsewhere,
    LaTeX commands (\\frac) excluded; dots dropped, so "p.m." is "pm"."""
    found = re.findall(r"[a-zA-Z]+", " ".join(re.findall(WRAPPED, s)).replace(".", ""))
    found += re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}", re.sub(WRAPPED, " ", s).replace(".", ""))
    return {w.lower() for w in found}


def mv_applies(pred, ref):
    """Whether math-verify's "equal" may be trusted for this pair (the limits in the module docstring)."""
    if any(re.search(r"\d:\d\d", s) or re.search(r"\d\s+\d", normalise(s)) or len(s) > 1000 for s in (pred, ref)):
        return False
    a, b = words(pred), words(ref)
    return not (a and b and a != b) and not prefixes_clash(normalise(pred), normalise(ref))


def mv_verdict(pred, ref, timeout):
    """math-verify's verdict on `pred` against `ref` (each parsed as the content of a box), with its
    "equal" for two numbers checked without its chopping of small differences (1/2^98 = 1/2^99,
    e^{-100} = e^{-101}): rational ones (decimals as written) must agree exactly, irrational ones to
    40 digits, a decimal and an irrational to 1e-6 relative besides its rounding. Runs in the worker."""
    from math_verify import parse, verify
    from sympy import Eq, Float, Rational
    gold, target = (parse(f"\\boxed{{{s}}}", parsing_timeout=timeout) for s in (ref, pred))
    if not (gold and target and verify(gold, target, timeout_seconds=timeout)):
        return False
    g, t = (e.rhs if isinstance(e, Eq) and e.lhs.is_Symbol else e for e in (gold[0], target[0]))  # x = 1/3
    try:
        if not (g.is_number and t.is_number):
            return True  # sets, matrices, expressions with symbols: math-verify's verdict stands
        decimals = bool(g.atoms(Float) or t.atoms(Float))
        g, t = (e.xreplace({f: Rational(str(f)) for f in e.atoms(Float)}) for e in (g, t))
        tolerance = 1e-40 if g.is_rational and t.is_rational or not decimals else 1e-6
        difference, scale = abs((g - t).evalf(60)), max(abs(g.evalf(60)), abs(t.evalf(60)))
        return bool(difference <= scale * tolerance)
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
    if exact_values(normalise(pred)) is not None and exact_values(normalise(ref)) is not None:
        return builtin_equal(pred, ref)
    return use_math_verify and mv_applies(pred, ref) and mv_equal(pred, ref) or builtin_equal(pred, ref)


def same_answer(a, b):
    """One vote for two answers: is_equiv in a fixed order of the pair, so symmetric."""
    return is_equiv(*sorted((a, b)))


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
    if not use_math_verify:
        return "built-in"
    return f"math-verify {importlib.metadata.version('math-verify')} + built-in fallback"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
