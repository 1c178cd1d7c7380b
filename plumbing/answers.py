"""Reading the answer out of a response (`extract_answer`): its answer part (after the last `</think>`),
then its boxes, answer lines, last answer phrase, a last `####`/`A:` line, and for a numeric gold the
last number standing alone; a response that commits to several answers, is cut off mid-answer or only
copies a number from the question has none. Multiple-choice responses read a letter (`read_letter`).
Every rule, and where it differs from LightEval's reading: docs/grading.md. grader.py compares.

    python -m pytest -q tests/test_answers.py
"""
import bisect
import re

from plumbing.values import MINUS, WRAPPED, builtin_equal, exact_values, normalise, split_unit, strip_math

NUMBER = re.compile(r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
DELIMITERS = r"\$\$|\$|\\\(|\\\)|\\\[|\\\]"
ANSWER_IS = re.compile(r"(?i)(?:final answer|the answer)[\s*]*(?:is|:)[\s*:}]*|the answers are[\s*:]*"
                       r"|\banswer[\s*]*:[\s*}]*"  # the } of \text{Answer:}
                       r"|(?m:^[#> \t*]*final answer[ \t*:]*$)")  # a heading, the value on the next line
ANSWER_LINE = re.compile(r"(?im)^[#> \t*]*(?:final\s+)?answer[ \t*]*:[ \t*]*")  # "Answer: X" opening a line
LETTER = r"[\s*:$(]*(?:\\(?:text|textbf|mathrm|mathbf)\{\s*)?\(?([A-D])\)?\}?(?![A-Za-z0-9])"  # C, (C), \textbf{C}
CHOICE_IS = re.compile(r"(?i:\b(?:answer|choice|option)\b)(?:[\s*]*(?i:is|:|must be|should be))" + LETTER +
                       r"|(?i:\b(?:option|choice))\s+\(?([A-D])\)?\s+(?i:is (?:the )?(?:correct|right|answer))")
CONDITIONAL = re.compile(r"(?i)[ \t)*,]*(?:only if|if\b|unless|provided|assuming|when\b|or\b|would)")  # same clause
TEMPLATE = re.compile(r"(?i)['\"`“‘]\s*\**\s*$"  # in quotes: 'Answer: A'
                      r"|\b(?:format|e\.g\.|example|such as|template|end with)\b[^\n]{0,30}$"
                      r"|\b(?:format|example|template|like this)\b[^\n]*:\s*\n\s*$")  # the line after "format:"
PLACEHOLDER = re.compile(r"\s*(?:\\phantom\{[^{}]*\}|\\[hv]space\{[^{}]*\}|\\q?quad|_+|\?)?\s*")  # a blank box


def template(part, start):
    """Whether the answer statement at `start` is a template the response repeats, not its answer: in
    quotes ("I must end with 'Answer: A'") or after "format", "example" on its line or the line before."""
    return TEMPLATE.search(part[max(0, start - 300):start]) is not None


def answer_part(text, finished=True):
    """The part of a response that holds its answer: after the last `</think>`; the whole text when it
    has no thinking section; None when it opened one (<think>, <think3>) it never closed, or when it
    is unfinished without a `</think>` (cut off inside its thinking, or before any answer part)."""
    text = str(text).replace(MINUS, "-")
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    return None if re.search(r"<think\d*>", text) or not finished else text


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


def last_boxed(text):
    """Content of the last closed box, stripped; "" for an empty box; None without one. Linear time."""
    boxes = boxed_spans(text)
    return boxes[-1][2] if boxes else None


def box_group(text, spans):
    """The contents of the last of `spans` and of those before it joined to the next by a few words at
    most ("x = \\boxed{3} and x = \\boxed{5}", "\\boxed{1}, \\boxed{2}"): the parts of a multi-part answer."""
    group = spans[-1:]
    for before in reversed(spans[:-1]):
        between = re.sub(WRAPPED, r" \1 ", text[before[1]:group[0][0]])
        if "\n\n" in between or len(re.findall(r"(?<!\\)\b[a-zA-Z]+", between)) > 4:
            break
        group.insert(0, before)
    return [c for _, _, c in group if c]


def gold_answer(answer):
    """The final answer of a gold field (`read_gold`), or all of it where none can be read."""
    return read_gold(answer) or strip_math(str(answer).strip().replace(MINUS, "-"))


def read_gold(answer):
    """The final answer of a gold field: a last line `#### n` (GSM8K) or `A: n` (its model solutions),
    else its box(es) (parts a few words apart are read together); in a worked solution (sentences with
    two words outside math: "Since $x^2 = 49$ and $x>0$, $x = 7$.") its answer phrase or last standalone
    number ("7"), None if it has neither; else the answer itself, delimiters stripped."""
    answer = str(answer).strip().replace(MINUS, "-")
    last = answer.rsplit("\n", 1)[-1]
    for mark in ("####", "A:"):
        if last.startswith(mark):
            return last[len(mark):].strip().replace(",", "")
    spans = boxed_spans(answer)
    if spans and box_group(answer, spans):
        return ", ".join(box_group(answer, spans))
    outside = re.sub(r"\$\$.+?\$\$|\$.+?\$|\\\(.+?\\\)|\\\[.+?\\\]|\\[a-zA-Z]+(?:\{[^{}]*\})?", " ", answer, flags=re.S)
    sentences = answer.endswith(".") or "\n" in answer or len(answer) > 80
    if sentences and len(re.findall(r"\b[a-zA-Z]{2,}\b", outside)) >= 2:
        return extract_answer(answer, gold="0")
    return strip_math(answer) or None


def answer_phrase(text, start):
    """The answer that follows a marker at `start`: a $...$, \\(...\\) or \\[...\\] formula, else the rest
    of the sentence or clause ("7, which ..." -> "7"; "The largest $n$ is 34" -> "34"), from the next
    line when the marker ends its line (a heading); without math delimiters around it ("\\[Answer:
    009\\]" -> "009"); None when that is empty or over 100 characters (prose)."""
    rest = text[start:start + 300]
    line = rest.split("\n", 1)[0]
    if not re.sub(rf"\s|\*|{DELIMITERS}", "", line) and "\n" in rest:
        line = next((l for l in rest.split("\n")[1:] if re.sub(rf"\s|\*|{DELIMITERS}", "", l)), "")
    m = re.match(r"\s*(?:\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\])", line)
    clause = re.split(r"\.(?:\s|$)|,\s+(?=[a-z]{2})|\bI hope\b", line, maxsplit=1)[0]  # "7, which ..." -> "7"
    phrase = next(filter(None, m.groups())) if m else clause
    phrase = re.sub(rf"^(?:\s|{DELIMITERS})+|(?:\s|{DELIMITERS})+$", "", phrase.strip(" *.")).strip(" *.")
    said = re.fullmatch(r".*[A-Za-z].*\s(?:is|are|equals)\s+(.+)", phrase)
    phrase = strip_math(said.group(1)) if said else phrase  # "The largest $n$ is 34" -> "34"
    return phrase if 0 < len(phrase) <= 100 else None


def dangling(part):
    """Whether the answer part ends in an answer marker with nothing after it ("so the answer is"): a
    response cut off while it gave its answer, which has none."""
    tail = part[-300:]  # a marker with nothing after it stands at the end
    if re.search(r"(?:^|\n)[ \t*]*(?:####|A:)[\s*]*$", tail):  # GSM8K's answer line, cut after its mark
        return True
    last = None
    for last in ANSWER_IS.finditer(tail):
        pass
    return last is not None and not re.sub(rf"\s|\*|:|{DELIMITERS}", "", tail[last.end():])


def several(answer):
    """Whether an answer names alternatives: "3 or 5", "x = 3 \\text{ or } x = 5", "0, 1, 2, 3, 4 or 5"; not
    inequalities joined by "or" ("x < 1 or x > 2"), which are one set."""
    answer = re.sub(WRAPPED, r" \1 ", answer)
    if re.search(r"[<>]|\\(?:le|ge|leq|geq|lt|gt|neq|ne)(?![a-z])", answer):
        return False
    return bool(re.search(r"(?<![A-Za-z\\])(?:or|either)(?![A-Za-z])|\\lor|\\vee", answer))


def one_answer(answer, gold, multi):
    """`answer`, or None when it names several: alternatives ("3 or 5") unless the gold has several parts
    (`multi`), or a list of numbers ("3 and 5", "3, 5") for a gold that is one number."""
    if answer is None or multi:
        return answer
    numbers = numbers_in(re.sub(r"\\frac\{[^{}]*\}\{[^{}]*\}", "1", answer))  # a fraction is one number
    listed = len(numbers) > 1 and re.search(r"\d\s*(?:,\s|and\b|\\text\{\s*and\s*\})\s*-?\d", answer)
    return None if several(answer) or listed and value_of(gold) is not None else answer


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


def value_of(answer):
    """The one exact value of a numeric answer, its unit dropped ("1,000"; "5 \\text{ cm}" -> 5), else None."""
    values = exact_values(normalise(split_unit(strip_math(str(answer)))[0]))
    return next(iter(values)) if values and len(values) == 1 else None


def numbers_in(text):
    """[(start, value)] of the standalone numbers of a text (not inside a word: H2O's 2 is none)."""
    return [(m.start(), value_of(m.group())) for m in NUMBER.finditer(text)
            if not re.search(r"[A-Za-z_^]$", text[max(0, m.start() - 1):m.start()])]


STATED = re.compile(r"(?i)(?:[\d)}\]!]\s*=|>>|\\approx|≈|####|\bA:|\b(?:is|are|was|were|be|equals?|gives?|gets?"
                    r"|got|makes?|total of|answer)\s*:?)$")


def copied(answer, text, question):
    """Whether a numeric answer is only copied from the question: the question gives that number and the
    response never states it as a result, that is after "=" that ends a computation ("4 + 6 = 10", not
    "P = 10"), a calculator's ">>", "\\approx", an answer word or a verb such as "is" (unless the two
    words before it are those before it in the question: a restatement)."""
    value = value_of(answer) if question else None
    if value is None:
        return False
    given = [start for start, v in numbers_in(question) if v == value]
    if not given:
        return False
    tokens = lambda s: re.findall(r"[A-Za-z]+|\d+(?:\.\d+)?|[=+\-*/<>:]", s)[-2:]
    restated = [tokens(question[max(0, start - 40):start]) for start in given]
    for start, v in numbers_in(text):
        before = text[max(0, start - 60):start]
        before = re.sub(r"\\(?:boxed|text|textbf|mathrm)\{|\\\(|\\\[|\$|\*|\{", " ", before)  # wrappers
        if v == value and STATED.search(before.rstrip()) and tokens(before) not in restated:
            return False
    return True


def last_number(text):
    """The last number that stands alone: not inside a word ("H2O"), next to a letter, ^, _ or \\, nor
    inside a pair of braces (the 2 of "\\frac{1+\\sqrt{5}}{2}"), with its minus sign; None without one,
    and None when it is an alternative ("3 or 5"). Linear time: the brace pairs, merged, are bisected."""
    pairs, stack = [], []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            pairs.append((stack.pop(), m.start()))
    covered = []  # disjoint [start, end] spans inside closed braces, in order
    for start, end in sorted(pairs):
        if covered and start <= covered[-1][1]:
            covered[-1][1] = max(covered[-1][1], end)
        else:
            covered.append([start, end])
    starts = [start for start, _ in covered]
    numbers = list(NUMBER.finditer(text))
    for k in reversed(range(len(numbers))):
        m = numbers[k]
        i = bisect.bisect_right(starts, m.start()) - 1
        if i >= 0 and m.start() < covered[i][1]:
            continue
        before, after = text[max(0, m.start() - 2):m.start()], text[m.end():m.end() + 2]
        if not re.search(r"[\w\\^_.,]$", before) and not re.match(r"[A-Za-z\d^_]|[.,]\d", after):
            between = text[numbers[k - 1].end():m.start()][-40:] if k else ""
            if re.search(r"(?<![A-Za-z])(?:or|either)(?![A-Za-z])", between):
                return None  # "3 or 5", "x = 3 or x = 5": alternatives, not one answer
            return ("-" if re.fullmatch(r"(?:^|.?[\s(=$])-", before) else "") + m.group()
    return None


def agreed(answers, same):
    """The last of `answers` when all of them are one answer by `same`, else None (several answers)."""
    distinct = list(dict.fromkeys(answers))
    return distinct[-1] if all(same(a, distinct[-1]) for a in distinct[:-1]) else None


def extract_answer(text, gold=None, kind="math", finished=True, question=None, same=builtin_equal):
    """The answer of a response, by the stages of the module docstring, or None. kind "choice" reads a
    letter (`read_letter`); kind "math" a formula, and the last number only for a numeric `gold`. An
    unfinished response is read without its last line (the cut may have left it half-written) and
    without the last-number stage. `question`: the problem's text, for the copied-number rule;
    `same(a, b)`: whether two answers of one response are one (grader.py passes its is_equiv)."""
    part = answer_part(text, finished)
    if part is None or dangling(part):
        return None
    part = part if finished else part.rsplit("\n", 1)[0] if "\n" in part else ""
    if kind == "choice":
        return read_letter(part, finished)
    multi = gold is not None and (parts(gold) > 1 or several(str(gold)))
    spans = [s for s in boxed_spans(part) if not PLACEHOLDER.fullmatch(s[2]) or s[2] == ""]
    if spans and spans[-1][2] == "" and not re.sub(rf"\s|[.*]|{DELIMITERS}", "", part[spans[-1][1]:]):
        return None  # the final answer is an empty box
    spans = [s for s in spans if s[2] and not copied(s[2], text, question)]  # an empty box in passing: read on
    if spans:
        if multi:
            group = box_group(part, spans)
            return ", ".join(group) if len(group) > 1 else strip_math(spans[-1][2])
        return one_answer(agreed([strip_math(c) for _, _, c in spans], same), gold, multi)
    lines = [answer_phrase(part, m.end()) for m in ANSWER_LINE.finditer(part) if not template(part, m.start())]
    if len([a for a in lines if a]) > 1:
        return one_answer(agreed([a for a in lines if a], same), gold, multi)
    for m in reversed(list(ANSWER_IS.finditer(part))):
        phrase = answer_phrase(part, m.end())
        if phrase:
            return one_answer(phrase, gold, multi)
    m = re.fullmatch(r"\s*(?:####|A:)\s*(.+?)\s*", part.rstrip().rsplit("\n", 1)[-1])
    if m:
        return m.group(1).rstrip(".")
    if finished and gold is not None and exact_values(normalise(split_unit(strip_math(str(gold)))[0])) is not None:
        number = last_number(part)
        return None if number is None or copied(number, text, question) else number
    return None


def letter_of(s):
    """The choice letter A-D that `s` is ("C", "(c)", "\\text{C}", "\\textbf{C}", "C) 42 eV"), else None."""
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", str(s)).strip(" $*.")
    m = re.fullmatch(r"\(?([A-Da-d])\)?", s) or re.fullmatch(r"\(?([A-D])[).:]\s.*", s)
    return m.group(1).upper() if m else None


def read_letter(part, finished=True):
    """The committed choice letter of a multiple-choice answer part, or None: the letters of its boxes and
    "Answer: X" lines when they agree (none when they differ: "four boxed letters"); else the last
    "the answer is X", "the correct choice is X" or "option X is correct" that is not conditional ("A
    only if ...", "A or B") nor a template ("'Answer: A'", "the format Answer: A"); else a last line
    that is a letter ("C", "(C)", "\\textbf{C}", "B) 4.2 eV"), when the response finished."""
    boxes = boxed_spans(part)
    if boxes and boxes[-1][2] == "" and not re.sub(rf"\s|[.*]|{DELIMITERS}", "", part[boxes[-1][1]:]):
        return None
    strong = [letter_of(c) for _, _, c in boxes if letter_of(c)]
    for m in ANSWER_LINE.finditer(part):
        line = re.match(LETTER + r"(?:[\s*$.]*$|[).:]\s)", part[m.end():].split("\n", 1)[0] + "\n")
        if line and not template(part, m.start()):
            strong.append(line.group(1))
    if strong:
        return strong[-1] if len(set(strong)) == 1 else None
    for m in reversed(list(CHOICE_IS.finditer(part))):
        if not CONDITIONAL.match(part, m.end()) and not template(part, m.start()):
            return m.group(1) or m.group(2)
    last = part.rstrip().rsplit("\n", 1)[-1]
    prose = len(last) > 60 or re.search(r"(?i)\b(?:is|are|not|because|but|wrong|incorrect|too|if)\b", last)
    return letter_of(last) if finished and not prose else None  # "B) 4.2 eV", not "B) 4.2 eV is too high"
