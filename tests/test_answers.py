"""Tests of answers.py on the CPU: reading the answer out of a response, one family of responses per
test (docs/grading.md lists the rules), through grader.grade as score.py calls it.

    python -m pytest -q tests/test_answers.py
"""
import time

import pytest
from plumbing import answers, grader

Q = "Tom has 5 apples. He gives 2 to Ann and gets 2 from Bob. How many apples does he have now?"
AREA = "A rectangle has sides 5 and 2. What is its area?"

# (response, gold, kind, finished, question) by family: responses a careful grader calls wrong although
# the gold stands in them, each family of docs/grading.md with a control below it that is right
FLATTERING = {
    "the thinking is not the answer": [
        ("<think>\nTry: the answer is \\boxed{12}.\n</think>\n\nRechecking, the answer is $\\boxed{14}$.", "12"),
        ("Let me think. Answer: 12\n</think>\n\nI could not finish the computation.", "12"),
        ("<think>\nSo the answer is \\boxed{12}. But wait, let me", "12"),  # cut off inside its thinking
        ("<think3>\nSo the answer is \\boxed{12}.", "12"),  # a forking tag opens thinking too
        ("So the answer is \\boxed{12}. But wait", "12", "math", False),  # unfinished, no </think>
    ],
    "one answer or none": [
        ("If n is even the count is \\boxed{4}; if n is odd it is \\boxed{6}.", "6"),
        ("The number of real roots could be 0, 1, 2, 3, 4 or 5.", "5"),
        ("Thus the answer is 3 or 5.", "5"),
        ("So x is 3 or 5.", "5"),
        ("So x = 3 or x = 5", "5"),
        ("The answers are 3 and 5.", "5"),
        ("$\\boxed{3 \\text{ or } 5}$", "5"),
        ("Answer: 12\nAnswer: 14", "14"),
        ("Answer: A\nAnswer: B\nAnswer: C", "C", "choice"),
        ("$\\boxed{A}$, $\\boxed{B}$, $\\boxed{C}$, $\\boxed{D}$", "D", "choice"),
    ],
    "cut off": [
        ("We found 12 and then 14, so the answer is", "14"),
        ("We found 12 and then 14.\n\n**Final Answer**\n", "14"),
        ("Checking 14 again; the final answer is: $", "14"),
        ("I must end with 'Answer: A'. Let us check option A first: it says", "A", "choice"),
        ("The last line should have the format:\nAnswer: A\nNow the options. Option A is", "A", "choice"),
        ("Options B and C fail.\nAnswer:", "A", "choice"),
        ("She pays 3 + 4 = 7 dollars.\n#### ", "7"),
        ("</think>\n\nThe total is 1250, so the answer is 12", "12", "math", False),  # its last line may be cut
        ("</think>\n\nThe count is 14 and then", "14", "math", False),  # no last-number stage
    ],
    "a number copied from the question": [
        ("Tom starts with $\\boxed{5}$ apples.", "5", "math", True, Q),
        ("Tom has 5 apples and", "5", "math", True, Q),
        ("We know $P = \\boxed{5}$ here.", "5", "math", True, "Let $P = 5$ and $Q = 7$. Find $P$ if $Q = 7$."),
    ],
    "exact numbers inside containers": [
        ("\\boxed{(0.333333, 0.5]}", "(\\frac{1}{3}, \\frac{1}{2}]"),
        ("\\boxed{(0.3333333, 2)}", "(\\frac{1}{3}, 2)"),
        ("\\boxed{\\begin{pmatrix} 0.333333 \\\\ 0.5 \\end{pmatrix}}",
         "\\begin{pmatrix} \\frac13 \\\\ \\frac12 \\end{pmatrix}"),
        ("\\boxed{\\{0.142857, 2\\}}", "\\{\\frac{1}{7}, 2\\}"),
        ("\\boxed{[0.666667, \\infty)}", "[\\frac{2}{3}, \\infty)"),
    ],
    "base-n subscripts": [("\\boxed{52_9}", "52_8"), ("\\boxed{1011_{2}}", "1011_3"),
                          ("The answer is $52_{9}$.", "52_8")],
    "unicode minus": [("so x = \u22127", "7"), ("\\boxed{\u22125}", "5"), ("The answer is \u22123/4.", "\\frac34")],
    "the committed letter": [
        ("The answer is A only if the reaction is exothermic. It is not, so the correct choice is C.", "A", "choice"),
        ("It could be that the answer is B or D; checking units, option C is correct.", "B", "choice"),
    ],
}
RIGHT = {  # (response, gold, kind, finished, question) by family: responses a careful grader calls right
    "the answer after the thinking": [
        ("<think>\nTry: the answer is \\boxed{12}.\n</think>\n\nRechecking, the answer is $\\boxed{14}$.", "14"),
        ("Long thought, Answer: 12 no.\n</think>\n\n**Final Answer**\n\n14", "14"),
        ("Work.\n\n### Final Answer\n$\\frac{1}{2}$", "0.5"),
        ("Work.\n\n**Final Answer**\nThe total number of apples is 12.", "12"),
        ("</think>\n\nThe answer is \\boxed{12}.\nLet me check once more: 3 * 4 = 1", "12", "math", False),
    ],
    "one answer restated": [
        ("So \\boxed{14}.\n\nThus the answer is \\boxed{14}.", "14"),
        ("So \\boxed{\\frac{1}{2}}, that is \\boxed{0.5}.", "0.5"),
        ("Answer: B\n\nChecking again.\n**Answer: B**", "B", "choice"),
        ("$\\boxed{x \\le 1 \\text{ or } x \\ge 3}$", "x \\le 1 \\text{ or } x \\ge 3"),
        ("The roots are \\boxed{3} and \\boxed{5}.", "3, 5"),  # the gold has several parts
    ],
    "a given number the response arrives at": [
        ("He gives 2 and gets 2, so he has 5 - 2 + 2 = 5 apples: \\boxed{5}.", "5", "math", True, Q),
        ("Given a side of $\\boxed{5}$, the area is 2 * 5 = 10. The answer is 10.", "10", "math", True, AREA),
        ("Tom still has 5 apples.\nA: 5", "5", "math", True, Q),
    ],
    "repeating decimals": [("\\boxed{0.\\overline{3}}", "\\frac{1}{3}"), ("\\boxed{0.1\\overline{6}}", "\\frac16"),
                           ("The answer is 0.(36).", "\\frac{4}{11}"),
                           ("\\boxed{-1.\\overline{142857}}", "-\\frac{8}{7}")],
    "units spelled out": [("The area is 864 square inches.", "864 \\mbox{ inches}^2"),
                          ("\\boxed{864 \\text{ square inches}}", "864 \\mbox{ inches}^2"),
                          ("The answer is 12 feet.", "12\\text{ ft}")],
    "exact entries": [("\\boxed{(0.5, 2)}", "(\\frac{1}{2}, 2)"),
                      ("\\boxed{\\{0.25, 2\\}}", "\\{\\frac{1}{4}, 2\\}")],
    "base-n": [("\\boxed{52_{9}}", "52_9"), ("\\boxed{52_9}", "52")],
    "unicode minus": [("so x = \u22127", "-7"), ("\\boxed{\u22123/4}", "-\\frac34")],
    "letters": [
        ("Therefore the answer is $\\textbf{C}$", "C", "choice"), ("Answer: $\\text{B}$", "B", "choice"),
        ("Comparing the energies.\nB) 4.2 eV", "B", "choice"), ("Reasoning.\n\n**Answer: B**", "B", "choice"),
        ("The answer is A only if the reaction is exothermic. It is not, so the correct choice is C.", "C", "choice"),
        ("<think>\nAnswer: A? no.\n</think>\n\nAnswer: D", "D", "choice"),
        ("</think>\n\nThe correct answer is **C**.\n\nWhen we compare the energies, C wins.", "C", "choice"),
    ],
    "an empty box in passing": [("I will put the final answer in \\boxed{}.\nSo 3 + 7 = 10. The answer is 10.",
                                 "10")],
}


def family(table):
    return [pytest.param(*(case + ("math", True, None)[len(case) - 2:]), id=f"{name}: {case[0][:40]!r}")
            for name, cases in table.items() for case in cases]


@pytest.mark.parametrize("text,gold,kind,finished,question", family(FLATTERING))
def test_flattering_responses_are_graded_wrong(text, gold, kind, finished, question):
    pred, correct = grader.grade(text, gold, kind, finished=finished, question=question)
    assert not correct, pred


@pytest.mark.parametrize("text,gold,kind,finished,question", family(RIGHT))
def test_right_responses_are_graded_right(text, gold, kind, finished, question):
    assert grader.grade(text, gold, kind, finished=finished, question=question)[1]


def test_a_response_that_commits_to_several_answers_has_none():
    """None, not a wrong answer: the response never votes (score.py), whichever of its answers is right."""
    for text, gold, *kind in FLATTERING["one answer or none"]:
        assert grader.extract_answer(text, gold, *kind) is None, text
        other = "A" if kind else "0"
        assert grader.extract_answer(text, other, *kind) is None, text


def test_the_answer_part_is_after_the_last_think_and_none_while_thinking_is_open():
    assert answers.answer_part("a</think>b</think>c") == "c" and answers.answer_part("plain") == "plain"
    assert answers.answer_part("<think>\nunclosed") is None and answers.answer_part("<think2> unclosed") is None
    assert answers.answer_part("plain", finished=False) is None
    assert answers.answer_part("x</think>y", finished=False) == "y"


def test_an_unfinished_response_is_read_without_its_last_line_or_last_number():
    done = "</think>\n\nSo the answer is 12.\nDouble-check: 3 * 4 = 12"
    assert grader.grade(done, "12") == ("12", True)
    assert grader.grade(done, "12", finished=False) == ("12", True)  # the answer line is not the cut one
    assert grader.grade("</think>\n\nSo the answer is 12", "12", finished=False) == (None, False)
    assert grader.grade("</think>\n\n3 * 4 = 12\nso", "12") == ("12", True)
    assert grader.grade("</think>\n\n3 * 4 = 12\nso", "12", finished=False) == (None, False)


def test_copied_numbers_need_the_question_and_a_derivation_counts():
    assert grader.grade("Tom starts with $\\boxed{5}$ apples.", "5") == ("5", True)  # no question: no rule
    assert answers.copied("5", "Tom starts with $\\boxed{5}$ apples.", Q)
    assert not answers.copied("5", "so 5 - 2 + 2 = 5", Q) and not answers.copied("7", "\\boxed{7}", Q)
    assert not answers.copied("5", "The answer is \\boxed{5}.", Q)
    assert answers.copied("5", "Tom has 5 apples, so the number is", Q)  # "has 5": copied words, not a result

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
    assert grader.grade(r"x = \boxed{3} and x = \boxed{5}", "5") == (None, False)  # one part: two answers, none
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


