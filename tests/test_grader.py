"""Tests of grader.py on the CPU: answer extraction, the math-verify grader with its limits and the
built-in normalisations, one family of answers per test, and the worker's timeout.

    python -m pytest -q test_grader.py
"""
import threading
import time

import pytest
from plumbing import grader


WRONG = {  # (pred, gold) pairs a careful grader rejects, by family
    "distinct exact numbers": [("1,000,001", "1000000"), ("11,111,111,101", "11,111,111,100"), ("1450001", "1450000"),
                               ("11111111099", "11,111,111,100"), ("0.3333333", r"\frac{1}{3}"), ("-5", "5"),
                               ("2.0001", "2"), (r"0.5\%", "0.5"), (r"\frac{12}", r"\frac{1}{2}"), (r"\frac{12}", "0.5"),
                               ("x=0.3333333", r"\frac{1}{3}")],
    "tiny values": [(r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}"), (r"\frac{1}{2006!}", r"\frac{1}{2004!}"),
                    (r"2^{-100}", r"2^{-101}"), ("e^{-100}", "e^{-101}"), (r"\frac{\pi}{10^{20}}", r"\frac{\pi}{10^{21}}")],
    "one-letter prefixes": [("x=3", "y=3"), ("x=2x+1", "y=2x+1"), ("a = 7", "b = 7"), ("x=2x+1", "2x+1")],
    "digits across spaces": [("1 2", "12"), ("1 2", "3"), ("32, 349", "32349"), ("1,2", "12"), ("12,34", "1234"),
                             ("(1,000,000)", "1000000"), (r"1\,2", "12")],
    "words and units": [("4:30 a.m.", "4:30 p.m."), (r"4:30\text{ a.m.}", r"4:30\text{ p.m.}"), ("2:15", "4:30"),
                        ("3 days", "3 hours"), (r"3\text{ days}", r"3\text{ hours}"), (r"5\text{ cm}", r"5\text{ m}")],
    "other": [("4a", "4"), ("0.3", r"\frac13"), ("(3, 4)", "(4, 3)"), (r"\pi", "3.14159"), ("", "3"), (None, "3")],
}
RIGHT = {  # (pred, gold) pairs every careful grader accepts, by family
    "exact numbers": [("009", "9"), ("0.50", "0.5"), ("27.0", "27"), ("1,000,000", "1000000"), ("1000000", "1,000,000"),
                      ("10000", "10{,}000"), (r"6\,290\,000", "6290000"), ("1450000", "1,450,000"),
                      ("11111111100", "11,111,111,100"), (r"\frac12", "0.5"), (r"\dfrac{1}{9}", r"\frac19"),
                      ("-3/4", r"-\frac{3}{4}"), ("12.", "12"), (r"\$36", "36")],
    "percent": [(r"10\%", "10"), ("10", r"10\%"), (r"50\%", "0.5"), ("0.5", r"50\%"), (r"0.5\%", "0.005")],
    "one-letter prefixes": [("5", "x=5"), ("x=5", "x = 5"), ("2x+3", "y = 2x + 3"), ("-2x", "y = -2x"),
                            ("y=2x+3", "y = 2x + 3")],
    "units and degrees": [(r"5\text{ cm}", "5"), ("5", r"5\text{ cm}"), (r"12\text{ cm}^2", "12"), ("90^\\circ", "90"),
                          (r"5\mbox{ inches}", "5")],
    "format": [(r"\sqrt2", r"\sqrt{2}"), (r"\text{Evelyn}", "Evelyn"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
               ("(1, 2)", "(1,2)"), ("$7$", "7"), (r"4:30\text{ p.m.}", "4:30 p.m."), (r"\text{4:30 p.m.}", "4:30 p.m.")],
}
MATH_VERIFY_ONLY = [(r"3\sqrt{2}", r"\sqrt{18}"), (r"\{3, 4\}", r"\{4, 3\}"), ("3, 5", "5, 3"),
                    (r"\frac{1}{2^{98}}", r"\frac{2}{2^{99}}"), (r"1.5\times10^{3}", "1500"),
                    ("1.414214", r"\sqrt{2}")]


@pytest.fixture
def builtin_only(monkeypatch):
    """The built-in comparison alone, as when math-verify cannot decide."""
    monkeypatch.setattr(grader, "use_math_verify", False)


def family(table):
    return [pytest.param(pred, gold, id=f"{name}: {pred} vs {gold}") for name, pairs in table.items() for pred, gold in pairs]


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("pred,gold", family(WRONG))
def test_wrong_answers_are_wrong_with_and_without_math_verify(pred, gold, monkeypatch):
    assert not grader.is_equiv(pred, gold) and not grader.is_equiv(gold, pred)
    monkeypatch.setattr(grader, "use_math_verify", False)
    assert not grader.is_equiv(pred, gold) and not grader.is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", family(RIGHT))
def test_right_answers_are_right_by_a_named_normalisation(pred, gold, builtin_only):
    assert grader.builtin_equal(pred, gold) and grader.builtin_equal(gold, pred)
    assert grader.is_equiv(pred, gold) and grader.is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", MATH_VERIFY_ONLY)
def test_math_verify_decides_what_no_normalisation_names(pred, gold):
    assert grader.is_equiv(pred, gold) and not grader.builtin_equal(pred, gold)


def test_math_verify_is_the_grader_and_its_not_equal_is_not_final(builtin_only, monkeypatch):
    assert grader.grader_name() == "built-in"
    monkeypatch.setattr(grader, "use_math_verify", True)
    assert grader.grader_name().startswith("math-verify ") and grader.grader_name().endswith("+ built-in fallback")
    assert not grader.mv_equal(r"4:30\text{ p.m.}", "4:30 p.m.") and grader.is_equiv(r"4:30\text{ p.m.}", "4:30 p.m.")


def test_two_exact_numbers_never_reach_math_verify(monkeypatch):
    monkeypatch.setattr(grader, "mv_equal", lambda pred, ref: pytest.fail(f"math-verify asked about {pred}, {ref}"))
    assert grader.is_equiv("1,000,000", "1000000.0") and not grader.is_equiv("1000001", "1000000")
    assert grader.is_equiv(r"\frac{3}{4}", "0.75") and not grader.is_equiv(r"\frac{3}{4}", "0.7500001")


def test_thousands_separators_only_in_proper_groups_of_three():
    read = lambda s: grader.exact_values(grader.normalise(s))
    assert read("1,000,000") == read("10{,}00{,}000".replace("{,}", "")) == {1000000}
    assert read(r"6\,290\,000") == {6290000} and read("58,500") == {58500}
    for bad in ("1,00,000", "1,2", "12,34", "1 000", "32, 349", r"1\,2", "1,0000"):
        assert read(bad) is None, bad


# ----------------------------------------------------------------------------- extraction

def test_extraction_reads_every_documented_form_in_order():
    x = grader.extract_answer
    assert x(r"so $\boxed 5$.") == "5" and x(r"\fbox{7}") == "7" and x(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert x("Thus the answer is 7.") == "7" and x("So the answer is 7, which is odd.") == "7"
    assert x(r"Therefore, the final answer is: $\frac{1}{2}$. I hope it is correct") == r"\frac{1}{2}"
    assert x("**Final Answer:** 12.5.") == "12.5"
    assert x("She pays 3 * 6 = 18.\n#### 1,018") == "1,018" and x("2 + 5 = <<2+5=7>>7\nA: 7") == "7"
    assert x(r"The answer is 3. Check: \boxed{4}") == "4"  # a box comes first
    assert x("The answer is 3.\nA: 4") == "3"  # then "the answer is", then a last line
    assert x("The answer is 7. Then 8 more", gold="7") == "7"  # the last number only when nothing else
    assert grader.grade("so 1018 in all\nA: 1,018", "She pays 3 * 6 = 18.\n#### 1,018") == ("1,018", True)


def test_an_answer_phrase_loses_the_math_delimiters_around_it():
    assert grader.grade(r"\[Answer: 009\]", "9") == ("009", True)
    assert grader.grade(r"\(Answer: 42\)", "42") == ("42", True)
    assert grader.grade(r"$$Answer: \frac{1}{2}$$", "0.5") == (r"\frac{1}{2}", True)
    assert grader.grade(r"\[ \text{Answer: } 12 \]", "12") == ("12", True)


def test_the_last_number_stands_alone():
    x = grader.extract_answer
    assert x("The gas is H2O and then we", gold="2") is None
    assert x(r"$x = \frac{1+\sqrt{5}}{2}$", gold="2") is None and x("so $x^2$ grows", gold="2") is None
    assert x("5 apples, then 6 more", gold="6") == "6" and x("so x = -7.", gold="-7") == "-7"
    assert x("in all 1,000,000 grains", gold="1000000") == "1,000,000" and x("5 cm and 6cm", gold="5") == "5"
    assert x("5 apples, then 6 more", gold="x + 1") is None and x("no numbers here", gold="6") is None


def test_per_part_boxes_are_read_together_when_the_gold_has_parts():
    assert grader.grade(r"x = \boxed{3} and x = \boxed{5}", "3, 5") == ("3, 5", True)
    assert grader.grade(r"x = \boxed{5} or x = \boxed{3}", r"\{3, 5\}")[1]
    assert grader.grade(r"x = \boxed{3} and x = \boxed{5}", "5") == ("5", True)  # one part: the last box
    assert grader.grade("First \\boxed{1}.\n\nSo the roots are \\boxed{3}, \\boxed{5}", "3, 5") == ("3, 5", True)
    assert not grader.grade(r"x = \boxed{3} and x = \boxed{4}", "3, 5")[1]
    assert grader.gold_answer(r"\boxed{1} papers and \boxed{2} bins") == "1, 2"


def test_a_worked_solution_gives_its_final_answer_as_the_gold():
    assert grader.read_gold("Since $x^2 = 49$ and $x>0$, $x = 7$.") == "7"
    assert grader.read_gold(r"Adding them, the sum is $\boxed{12}$ in all.") == "12"
    assert grader.read_gold("We count the cases. The answer is 42.") == "42"
    assert grader.read_gold("Each side is $x$, so the area is $x^2$.") is None  # no number stands alone
    assert grader.read_gold("x^5 - x^4 + 1") == "x^5 - x^4 + 1" and grader.read_gold(r"\text{Evelyn}") == r"\text{Evelyn}"


def test_an_empty_box_is_no_answer():
    assert grader.extract_answer(r"\boxed{}", gold="3") is None
    assert grader.extract_answer(r"\boxed{3}, then \boxed{ }", gold="3") is None  # the last box decides
    assert grader.grade(r"\boxed{}", "3") == (None, False)


def test_last_boxed_is_linear_in_unclosed_boxes():
    start = time.perf_counter()
    assert grader.last_boxed(r"\boxed{" * 2000 + "x") is None  # the first scorer took 3.8 s
    text = r"\boxed{ loop 1, " * 20000
    text += "y" * (250_000 - len(text)) + r" \boxed{7} \boxed{"
    assert grader.grade(text, "7") == ("7", True)
    assert grader.grade(text[:-20], "7")[0] == "1"  # no closed box: the last number
    assert time.perf_counter() - start < 1.0


def test_last_boxed_pairs_braces_and_ignores_escaped_ones():
    assert grader.last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert grader.last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert grader.last_boxed(r"\boxed{3} and \boxed{4") == "3"
    assert grader.last_boxed(r"} \boxed{\left\{ x \right.}") == r"\left\{ x \right."


def test_grade_compares_choice_letters_exactly():
    g = grader.grade
    assert g("... so **Answer: C**", "C", "choice") == ("C", True)
    assert g("The answer is (b) hmm. No: the answer is (B).", "B", "choice") == ("B", True)
    assert g(r"$\boxed{\text{D}}$", "D", "choice") == ("D", True) and g(r"\boxed{d}", "D", "choice") == ("D", True)
    assert g("reasoning\n(C)", "C", "choice") == ("C", True) and g("reasoning\n**A**", "A", "choice") == ("A", True)
    assert g("Answer: A", "C", "choice") == ("A", False)
    assert g("the answer is a prime", "A", "choice") == (None, False)  # prose, not a letter
    assert g(r"\boxed{3.5 eV}" + "\nAnswer: B", "B", "choice") == ("B", True)  # a box without a letter


# ----------------------------------------------------------------------------- the worker

def test_a_grade_off_the_main_thread_cannot_hang(monkeypatch):
    monkeypatch.setattr(grader, "MV_TIMEOUT", 1)
    result = []
    worker = threading.Thread(target=lambda: result.append(grader.grade(r"$\boxed{2003^{2002^{2001}}}$", "2003")))
    start = time.perf_counter()
    worker.start()
    worker.join(timeout=20)
    assert result == [("2003^{2002^{2001}}", False)] and time.perf_counter() - start < 10


def test_a_worker_past_its_limit_is_killed_and_replaced(monkeypatch):
    monkeypatch.setattr(grader, "WORKER_LIMIT", 0.5)  # math-verify's own timeout (5 s) never comes
    start = time.perf_counter()
    assert grader.ask_worker("2003", "2003^{2002^{2001}}") is False and time.perf_counter() - start < 5
    monkeypatch.setattr(grader, "WORKER_LIMIT", 15)
    assert grader.ask_worker(r"\sqrt{18}", r"3\sqrt{2}") is True  # a fresh worker
