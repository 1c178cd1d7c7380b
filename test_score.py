"""Tests of score.py on the CPU: answer extraction, the math-verify grader and its built-in fallback,
votes, native Cons@N sets, rows files, and agreement with the external labels of two real files.

    python -m pytest -q test_score.py
"""
import json
import os
import time

import pytest

import score

HERE = os.path.dirname(os.path.abspath(__file__))


def shared_data(name):
    path = os.path.join(HERE, "..", "shared", "data", name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture
def builtin_only(monkeypatch):
    """The built-in comparison alone, as when math-verify cannot decide."""
    monkeypatch.setattr(score, "mv_verify", None)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts(*answers):
    return [{"text": t} for t in answers]


# ----------------------------------------------------------------------------- extraction

def test_extraction_reads_every_documented_form_in_order():
    x = score.extract_answer
    assert x(r"so $\boxed 5$.") == "5" and x(r"\fbox{7}") == "7" and x(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert x("Thus the answer is 7.") == "7" and x("So the answer is 7, which is odd.") == "7"
    assert x(r"Therefore, the final answer is: $\frac{1}{2}$. I hope it is correct") == r"\frac{1}{2}"
    assert x("**Final Answer:** 12.5.") == "12.5"
    assert x("She pays 3 * 6 = 18.\n#### 1,018") == "1,018" and x("2 + 5 = <<2+5=7>>7\nA: 7") == "7"
    assert x(r"The answer is 3. Check: \boxed{4}") == "4"  # a box comes first
    assert x("The answer is 3.\nA: 4") == "3"  # then "the answer is", then a last line
    assert score.grade("so 1018 in all\nA: 1,018", "She pays 3 * 6 = 18.\n#### 1,018") == ("1,018", True)


def test_last_number_is_read_only_for_numeric_golds():
    assert score.extract_answer("5 apples, then 6 more", gold="6") == "6"
    assert score.extract_answer("5 apples, then 6 more", gold=r"\frac{1}{2}") == "6"
    assert score.extract_answer("5 apples, then 6 more", gold="x + 1") is None
    assert score.extract_answer("no numbers here", gold="6") is None


def test_an_empty_box_is_no_answer_and_never_votes(tmp_path):
    rows = [{"id": 0, "gold": "3", "completions": texts(r"\boxed{}", r"\boxed{}", r"\boxed{3}")}]
    m = score.main(score.parse_config([write_rows(tmp_path / "r.jsonl", rows), "--set_size", "3"]))
    assert m["cons@3"] == 1.0 and m["unparseable"] == pytest.approx(2 / 3)
    assert score.extract_answer(r"\boxed{}", gold="3") is None
    assert score.extract_answer(r"\boxed{3}, then \boxed{ }", gold="3") is None  # the last box decides
    assert score.grade(r"\boxed{}", "3") == (None, False)


def test_last_boxed_is_linear_in_unclosed_boxes():
    start = time.perf_counter()
    assert score.last_boxed(r"\boxed{" * 2000 + "x") is None  # the old scorer took 3.8 s
    assert time.perf_counter() - start < 0.5
    text = r"\boxed{ loop 1, " * 20000
    text += "y" * (250_000 - len(text)) + r" \boxed{7} \boxed{"
    start = time.perf_counter()
    assert score.grade(text, "7") == ("7", True)
    assert score.grade(text[:-20], "7")[0] == "1"  # no closed box: the last number
    assert time.perf_counter() - start < 1.0


def test_last_boxed_pairs_braces_and_ignores_escaped_ones():
    assert score.last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert score.last_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert score.last_boxed(r"\boxed{3} and \boxed{4") == "3"
    assert score.last_boxed(r"} \boxed{\left\{ x \right.}") == r"\left\{ x \right."


# ----------------------------------------------------------------------------- grading

def test_the_grader_is_math_verify_with_a_builtin_fallback():
    assert score.grader_name().startswith("math-verify ") and score.grader_name().endswith("+ built-in fallback")
    assert score.is_equiv(r"3\sqrt{2}", r"\sqrt{18}") and not score.builtin_equal(r"3\sqrt{2}", r"\sqrt{18}")
    assert score.is_equiv(r"\{3, 4\}", r"\{4, 3\}") and score.is_equiv("50\\%", "0.5")


def test_math_verify_not_equal_is_not_final():
    assert score.is_equiv("12.", "12") and not score.mv_equal("12.", "12")
    assert score.is_equiv(r"4:30\text{ p.m.}", "4:30 p.m.") and score.is_equiv("4:30 p.m.", r"\text{4:30 p.m.}")


def test_answers_a_careful_grader_rejects_are_wrong_in_both_modes(monkeypatch):
    wrong = [("4:30 a.m.", "4:30 p.m."), (r"4:30\text{ a.m.}", r"4:30\text{ p.m.}"), ("2:15", "4:30"),
             ("3 days", "3 hours"), (r"3\text{ days}", r"3\text{ hours}"), (r"5\text{ cm}", r"5\text{ m}"),
             ("(1,234)", "1234"), ("4a", "4"), ("0.3", r"\frac13"), ("-5", "5"), ("1,2", "12"),
             ("(3, 4)", "(4, 3)"), (r"\pi", "3.14159"), ("", "3"), (None, "3")]
    for pred, ref in wrong:
        assert not score.is_equiv(pred, ref), (pred, ref)
    monkeypatch.setattr(score, "mv_verify", None)
    for pred, ref in wrong:
        assert not score.is_equiv(pred, ref), (pred, ref)


def test_builtin_fallback_removes_every_thousands_separator(builtin_only):
    assert score.normalise("1,000,000") == "1000000" and score.normalise("10{,}000") == "10000"
    assert score.is_equiv("1000000", "1,000,000") and score.is_equiv("10000", "10{,}000")
    assert score.is_equiv(r"6\,290\,000", "6290000") and score.is_equiv("900,000,000", "900000000")
    assert not score.is_equiv("(1,000,000)", "1000000") and score.normalise("1,2") == "1,2"


def test_builtin_fallback_reads_dollars_units_prefixes_and_roots(builtin_only):
    assert score.normalise(r"\$36") == "36" and score.is_equiv("36", r"\$36")
    assert score.is_equiv(r"5\text{ cm}", "5") and score.is_equiv(r"5\mbox{ inches}", "5")
    assert score.is_equiv(r"12\text{ cm}^2", "12") and not score.is_equiv(r"3\text{ days}", r"3\text{ hours}")
    assert score.is_equiv("x=5", "5") and score.is_equiv(r"\sqrt2", r"\sqrt{2}") and score.is_equiv(r"\frac12", "0.5")
    assert score.is_equiv("12.", "12") and score.is_equiv(r"\text{Evelyn}", "Evelyn")
    assert score.grader_name() == "built-in"


def test_grade_compares_choice_letters_exactly():
    g = score.grade
    assert g("... so **Answer: C**", "C", "choice") == ("C", True)
    assert g("The answer is (b) hmm. No: the answer is (B).", "B", "choice") == ("B", True)
    assert g(r"$\boxed{\text{D}}$", "D", "choice") == ("D", True) and g(r"\boxed{d}", "D", "choice") == ("D", True)
    assert g("reasoning\n(C)", "C", "choice") == ("C", True) and g("reasoning\n**A**", "A", "choice") == ("A", True)
    assert g("Answer: A", "C", "choice") == ("A", False)
    assert g("the answer is a prime", "A", "choice") == (None, False)  # prose, not a letter
    assert g(r"\boxed{3.5 eV}" + "\nAnswer: B", "B", "choice") == ("B", True)  # a box without a letter


def test_choice_rows_vote_over_letters(tmp_path):
    rows = [{"id": "q", "kind": "choice", "gold": "B",
             "completions": texts("Answer: A", "Answer: B", "answer is (B)", "no idea")}]
    m = score.main(score.parse_config([write_rows(tmp_path / "gpqa.jsonl", rows), "--set_size", "2"]))
    assert m["pass@1"] == 0.5 and m["cons@2"] == 0.0 and m["cons@4"] == 1.0 and m["unparseable"] == 0.25


# ----------------------------------------------------------------------------- rows files and metrics

def test_scoring_regrades_stored_verdicts(tmp_path):
    stale = [{"text": r"\boxed{3}", "pred": "5", "correct": False}, {"text": r"\boxed{5}", "pred": "3", "correct": True}]
    path = write_rows(tmp_path / "graded.jsonl", [{"id": 0, "gold": "3", "completions": stale}])
    rows = score.read_rows(path)
    assert [(c["pred"], c["correct"]) for c in rows[0]["completions"]] == [("3", True), ("5", False)]
    first = score.main(score.parse_config([path]))
    assert score.main(score.parse_config([path])) == first and first["cons@2"] == 1.0


def test_ragged_rows_average_each_metric_over_the_problems_that_have_it(tmp_path):
    rows = [{"id": "full", "gold": "7", "completions": texts(*[r"\boxed{7}"] * 4)},
            {"id": "short", "gold": "7", "completions": texts(r"\boxed{1}", r"\boxed{7}")}]
    m = score.main(score.parse_config([write_rows(tmp_path / "r.jsonl", rows), "--set_size", "2"]))
    assert m["cons@4"] == 1.0 and m["counts"]["cons@4"] == 1 and m["pass@4"] == 1.0
    assert m["pass@1"] == pytest.approx((1 + 0.5) / 2) and m["counts"]["pass@1"] == 2
    assert m["cons@2"] == 0.5 and m["counts"]["cons@2"] == 2 and "cons@2" in json.load(open(tmp_path / "r.metrics.json"))


def test_ragged_warning_names_the_short_problems(tmp_path, capsys):
    rows = [{"id": "full", "gold": "7", "completions": texts(*[r"\boxed{7}"] * 4)},
            {"id": "short-one", "gold": "7", "completions": texts(r"\boxed{7}")}]
    score.main(score.parse_config([write_rows(tmp_path / "r.jsonl", rows)]))
    err = capsys.readouterr().err
    assert "warning" in err and "short-one" in err and "full" not in err.split("(")[1]


def test_duplicate_ids_and_empty_golds_name_the_line(tmp_path):
    one = {"id": "a", "gold": "1", "completions": texts(r"\boxed{1}")}
    with pytest.raises(score.DataError, match=r"dup.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        score.read_rows(write_rows(tmp_path / "dup.jsonl", [one, {**one, "id": "b"}, one]))
    for gold in (None, "", "  "):
        with pytest.raises(score.DataError, match="gold.jsonl:2: the gold answer is empty"):
            score.read_rows(write_rows(tmp_path / "gold.jsonl", [one, {**one, "id": "b", "gold": gold}]))
    with pytest.raises(score.DataError, match="kind.jsonl:1: a choice row needs a gold letter"):
        score.read_rows(write_rows(tmp_path / "kind.jsonl", [{**one, "kind": "choice", "gold": "42"}]))


def test_the_metrics_file_names_the_grader(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "r.jsonl", [{"gold": "1", "completions": texts(r"\boxed{1}")}])
    assert "math-verify" in score.main(score.parse_config([path]))["grader"]
    assert json.load(open(tmp_path / "r.metrics.json"))["grader"].startswith("math-verify 0.")
    monkeypatch.setattr(score, "mv_verify", None)
    assert score.main(score.parse_config([path]))["grader"] == "built-in"


def test_native_sets_of_block_order_are_the_authors_sets(tmp_path):
    num_forks, per_fork = 3, 4  # S = 4: token k answers responses 4k .. 4k + 3
    forks = [f"<think{k + 1}>" for k in range(num_forks) for _ in range(per_fork)]
    completions = [{"text": rf"\boxed{{{i}}}", "fork": f} for i, f in enumerate(forks)]
    path = write_rows(tmp_path / "block.jsonl", [{"gold": "0", "tag_order": "block", "completions": completions}])
    rows = score.read_rows(path)
    sets = score.native_sets(rows[0]["completions"], 6, "block")
    got = [[int(c["pred"]) for c in s] for s in sets]
    assert got == [[s + k * per_fork for k in range(num_forks)] for s in range(per_fork)]
    # without forks, a block row is split the authors' way: 10 over 3 tokens -> blocks of 4, 3, 3
    plain = [{"pred": str(i), "fork": None} for i in range(10)]
    assert [[int(c["pred"]) for c in s] for s in score.native_sets(plain, 3, "block")] == [[0, 4, 7], [1, 5, 8], [2, 6, 9]]
    assert [[int(c["pred"]) for c in s] for s in score.native_sets(plain, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


# ----------------------------------------------------------------------------- real labelled files

def agreement(rows_path, rows):
    """(pass@1 of the scorer, pass@1 of the labels, share of responses where they agree)."""
    graded = score.read_rows(rows_path)
    ours = [bool(c["correct"]) for r in graded for c in r["completions"]]
    labels = [bool(x) for r in rows for x in r["labels"]]
    return sum(ours) / len(ours), sum(labels) / len(labels), sum(a == b for a, b in zip(ours, labels)) / len(ours)


def test_math_cot_pass_at_1_matches_the_datasets_labels(tmp_path):
    rows = [{"id": r["idx"], "gold": r["gt"], "labels": r["score"], "completions": texts(*r["response"])}
            for r in map(json.loads, open(shared_data("math_cot_100x8.jsonl")))]
    ours, labels, agree = agreement(write_rows(tmp_path / "math.jsonl", rows), rows)
    assert labels == pytest.approx(0.91) and abs(ours - labels) < 0.005 and agree > 0.995


def test_gsm8k_model_solutions_pass_at_1_matches_their_labels(tmp_path):
    names = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    rows = [{"id": i, "gold": r["ground_truth"], "labels": [r[k]["is_correct"] for k in names],
             "completions": texts(*[r[k]["solution"] for k in names])}
            for i, r in enumerate(map(json.loads, open(shared_data("gsm8k_test_4models.jsonl"))))]
    ours, labels, agree = agreement(write_rows(tmp_path / "gsm.jsonl", rows), rows)
    assert labels == pytest.approx(0.379, abs=5e-4) and abs(ours - labels) < 0.003 and agree > 0.995
