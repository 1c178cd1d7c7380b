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
    "decimals inside containers": [("(0.333333, 0.5]", r"(\frac{1}{3}, \frac{1}{2}]"), ("(0.3333333, 2)", r"(\frac13, 2)"),
                                   (r"\begin{pmatrix} 0.333333 \\ 2 \end{pmatrix}", r"\begin{pmatrix} \frac13 \\ 2 \end{pmatrix}"),
                                   (r"\{0.142857, 2\}", r"\{\frac{1}{7}, 2\}")],
    "base-n subscripts": [("52_9", "52_8"), ("52_{9}", "52_{8}"), ("1011_2", "11")],
    "units spelled out": [("864 square inches", "864 square feet"), ("864 square inches", r"864\text{ inches}^3")],
    "unicode minus": [("\u22125", "5"), ("\u2212\\frac{3}{4}", r"\frac34")],
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
    "repeating decimals": [(r"0.\overline{3}", r"\frac13"), ("0.(3)", r"\frac{1}{3}"), (r"0.1\overline{6}", r"\frac16"),
                           (r"1.\overline{142857}", r"\frac{8}{7}")],
    "units spelled out": [("864 square inches", r"864 \mbox{ inches}^2"), ("12 feet", r"12\text{ ft}"), ("3 days", "3")],
    "base-n subscripts": [("52_{9}", "52_9"), ("52", "52_9"), ("A3_{16}", "A3_16")],
    "unicode minus": [("\u22125", "-5"), ("\u2212\\frac{3}{4}", "-0.75")],
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


def test_last_boxed_takes_the_last_balanced_answer():
    assert grader.last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert grader.last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert grader.last_boxed(r"\boxed{3} and \boxed{4") == "3"  # unclosed last one: the one before
    assert grader.last_boxed("no answer") is None
    assert grader.gold_answer("She pays 3 * 6 = 18.\n#### 1,018") == "1018"
    assert grader.gold_answer(r"so it is $\boxed{\pi}$") == r"\pi"
    assert grader.gold_answer(204) == "204"


def test_builtin_equivalence_normalises_numbers_and_latex():
    assert grader.is_equiv("27", "27.0")
    assert grader.is_equiv(r"\dfrac{1}{2}", "0.5")
    assert grader.is_equiv(r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})")
    assert grader.is_equiv(r"10\%", "10") and grader.is_equiv("1,000", "1000")
    assert not grader.is_equiv("3", "4") and not grader.is_equiv(None, "4")
