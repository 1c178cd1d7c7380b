"""The built-in comparison of two answers: normalised strings, exact values, units, `v=` prefixes and
base-n subscripts (the rules and where they differ from LightEval: docs/grading.md).

grader.py asks math-verify first and turns to `builtin_equal` where it says "not equal" or may not be
trusted; answers.py uses `exact_values` to tell numbers apart. Nothing here starts a process.

    python -m pytest -q tests/test_grader.py
"""
import re
from fractions import Fraction

WRAPPED = r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}"
MINUS = "\u2212"  # Unicode minus: a minus sign wherever it stands


def strip_math(s):
    """s without one pair of math delimiters around all of it: $x$, $$x$$, \\(x\\), \\[x\\]."""
    m = re.fullmatch(r"\s*(?:\$\$(.+)\$\$|\$(.+)\$|\\\((.+)\\\)|\\\[(.+)\\\])\s*", s, re.S)
    inner = next(filter(None, m.groups())) if m else s
    return s.strip() if "$" in inner else inner.strip()  # "$a$ and $b$" is not one formula


def normalise(s):
    """The canonical string of an answer for the built-in comparison (the "format" rule)."""
    s = strip_math(str(s).replace(MINUS, "-"))
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
REPEATING = r"([-+]?)(\d*)\.(\d*)(?:\\overline\{(\d+)\}|\\overline(\d)|\((\d+)\))"  # 0.\overline{3}, 0.1(6)


def repeating_value(m):
    """The exact value of a repeating decimal matched by REPEATING: 0.1\\overline{6} = 1/6."""
    sign, whole, fixed, *cycle = m.groups()
    cycle = next(filter(None, cycle))
    tail = Fraction(int(fixed + cycle) - int(fixed or 0), (10 ** len(cycle) - 1) * 10 ** len(fixed))  # 0.1(6) -> 15/90
    value = int(whole or 0) + tail
    return -value if sign == "-" else value


def exact_values(s):
    """The values a normalised answer may mean, as exact fractions: {Fraction} for an integer, decimal,
    repeating decimal or fraction ("1,000,000", "0.50", "0.\\overline{3}", "0.(3)", "-\\frac{3}{4}", "3/4");
    for p\\% {p/100, p} when p is whole, else {p/100}; None for anything else (a thousands separator
    outside a proper group of three is none)."""
    percent = re.fullmatch(r"(.+?)\\?%", s)
    if percent:
        values = exact_values(percent.group(1))
        if values is None or len(values) != 1:
            return None
        (p,) = values
        return frozenset({p / 100} | ({p} if p.denominator == 1 else set()))
    repeating = re.fullmatch(REPEATING, s)
    if repeating:
        return frozenset({repeating_value(repeating)})
    m = re.fullmatch(rf"([-+]?)\\frac\{{({DECIMAL})\}}\{{({DECIMAL})\}}|()({DECIMAL})/({DECIMAL})|()({DECIMAL})", s)
    if not m or not re.search(r"\d", s):
        return None
    sign, *numbers = [g for g in m.groups() if g is not None]
    try:
        value = Fraction(numbers[0].replace(",", "")) / (Fraction(numbers[1].replace(",", "")) if len(numbers) > 1 else 1)
    except (ValueError, ZeroDivisionError):
        return None
    return frozenset({-value if sign == "-" else value})


UNIT_NAMES = {"in": "inch", "ft": "foot", "feet": "foot", "yd": "yard", "mi": "mile", "metre": "meter",
              "hr": "hour", "min": "minute", "sec": "second", "deg": "degree", "cents": "cent"}


def canonical_unit(unit):
    """One spelling of a unit: lower case, singular, "square inches" and "inches^2" both "inch^2"."""
    unit = re.sub(r"\^\{?(\d)\}?", r"^\1", unit.lower().replace(".", "")).strip()
    power = ""
    for word, p in (("square ", "^2"), ("sq ", "^2"), ("cubic ", "^3")):
        if unit.startswith(word):
            unit, power = unit[len(word):], p
    for word, p in ((" squared", "^2"), (" cubed", "^3")):
        if unit.endswith(word):
            unit, power = unit[:-len(word)], p
    unit, _, given = unit.partition("^")
    words = [UNIT_NAMES.get(w, singular(w)) for w in unit.split()]
    return " ".join(words) + (power or ("^" + given if given else ""))


def singular(word):
    """inches -> inch, days -> day; "cm", "gas" and "mass" stay."""
    if re.search(r"(?:ch|sh|x|ss)es$", word):
        return word[:-2]
    return word[:-1] if re.search(r"[^s]s$", word) and len(word) > 3 else word


def split_unit(s):
    """(answer, unit) of an answer that ends in a unit after a number: a \\text{}, \\mbox{} or \\mathrm{} one
    ("5\\text{ cm}" -> ("5", "cm")) or words ("864 square inches" -> ("864", "inch^2")), the unit in its
    `canonical_unit` spelling; a unit is letters and spaces only (so "p.m." is not one), and a plain one
    is at least two letters after a space (so "4a" is no unit)."""
    s = s.strip().replace(MINUS, "-")
    wrapped = r"(.*\d)\s*\\(?:text|mbox|mathrm)\{\s*([A-Za-z][A-Za-z ]*?)\s*\}(\^\{?\d\}?)?\s*\.?"
    m = re.fullmatch(wrapped, s) or re.fullmatch(r"(.*\d)\s+([A-Za-z]{2,}(?: [A-Za-z]+){0,2})(\^\{?\d\}?)?\s*\.?", s)
    return (m.group(1), canonical_unit(m.group(2) + (m.group(3) or ""))) if m else (s, "")


def split_base(s):
    """(digits, base) of a normalised base-n answer "52_9", "52_{9}", "1011_{2}" (the digits valid in
    that base), else (s, None)."""
    m = re.fullmatch(r"\(?([0-9A-Z]+)\)?_\{?\(?(\d+)\)?\}?", s)
    if not m or not 2 <= int(m.group(2)) <= 36:
        return s, None
    valid = all(int(d, 36) < int(m.group(2)) for d in m.group(1))
    return (m.group(1), int(m.group(2))) if valid else (s, None)


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
    """Whether the normalisations of docs/grading.md make `pred` and `ref` one answer. Symmetric; two
    exact numbers are equal only when some value of one is a value of the other; two units or two
    base subscripts must agree, and one on one side only is dropped."""
    (pred, unit_a), (ref, unit_b) = split_unit(strip_math(str(pred))), split_unit(strip_math(str(ref)))
    if unit_a and unit_b and unit_a != unit_b:
        return False
    a, b = normalise(pred), normalise(ref)
    if prefixes_clash(a, b):
        return False
    a, b = split_prefix(a)[1], split_prefix(b)[1]
    (a, base_a), (b, base_b) = split_base(a), split_base(b)
    if base_a and base_b and base_a != base_b:
        return False
    x, y = exact_values(a), exact_values(b)
    if x is not None or y is not None:
        return x is not None and y is not None and bool(x & y)
    return bool(a) and a.replace(", ", ",") == b.replace(", ", ",")
