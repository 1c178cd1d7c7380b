"""Tests of score.py on the CPU: votes that do not depend on order, native Cons@N sets, rows files of
every layout, and agreement with the external labels of two real files (grading: test_grader.py).

    python -m pytest -q test_score.py
"""
import itertools
import json
import os
import random

import pytest

import data
import score
from plumbing import evalfiles, grader

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def shared_data(name):
    path = os.path.join(HERE, "..", "shared", "data", name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent")
    return path


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def texts(*answers):
    return [{"text": t} for t in answers]


# ----------------------------------------------------------------------------- votes

def test_an_empty_box_is_no_answer_and_never_votes(tmp_path):
    rows = [{"id": 0, "gold": "3", "completions": texts(r"\boxed{}", r"\boxed{}", r"\boxed{3}")}]
    m = score.main(score.parse_config([write_rows(tmp_path / "r.jsonl", rows), "--set_size", "3"]))
    assert m["cons@3"] == 1.0 and m["unparseable"] == pytest.approx(2 / 3)


def graded(preds, gold, forks=None):
    """Completions as read_rows leaves them: each answer graded against the gold."""
    return [{"pred": p, "correct": grader.is_equiv(p, gold), "fork": f, "text": f"\\boxed{{{p}}}" if p else "?"}
            for p, f in zip(preds, forks or [None] * len(preds))]


def test_a_vote_does_not_depend_on_the_order_of_its_responses():
    # "5" equals "5 cm" and "5 m", which differ: a chain, one group, 1 of its 3 responses right
    three = graded(["5", r"5\text{ m}", r"5\text{ m}"], r"5\text{ cm}")
    assert {score.majority_vote(list(p)) for p in itertools.permutations(three)} == {1 / 3}
    five = graded(["7", "7.0", r"\frac{14}{2}", "5", "x=5"], "5")  # 3 votes for 7, 2 for 5
    assert {score.majority_vote(list(p)) for p in itertools.permutations(five)} == {0.0}


def test_a_tie_is_worth_the_mean_of_the_tied_groups_and_no_answer_is_wrong():
    assert score.majority_vote(graded(["5", "7", "7", "5"], "7")) == 0.5
    assert score.majority_vote(graded(["1", "2", "7", "4"], "7")) == 0.25
    assert score.majority_vote(graded([None, None, "7"], "7")) == 1.0 and score.majority_vote(graded([None] * 3, "7")) == 0.0


def test_every_metric_is_unchanged_when_the_responses_are_shuffled():
    """Any order of the responses gives the same cons@k and pass@k, with forks and without; native
    Cons@N sets keep their own membership (set j = each token's j-th response), so they are checked
    under orders that keep each token's responses in turn (and, without forks, each set's members)."""
    pool = ["7", "7.0", r"\frac{14}{2}", "5", "x=5", r"5\text{ m}", r"5\text{ cm}", None, "8"]
    rng = random.Random(0)
    native = lambda m: {k: v for k, v in m.items() if k.startswith("native_cons@")}
    rest = lambda m: {k: v for k, v in m.items() if not k.startswith("native_cons@")}
    for _ in range(30):
        gold = rng.choice(["7", r"5\text{ cm}"])
        forks = [f"<think{k}>" for k in (10, 2, 1) for _ in range(4)]
        responses = graded([rng.choice(pool) for _ in forks], gold, forks)
        base = score.problem_metrics(responses, 3)
        assert rest(score.problem_metrics(rng.sample(responses, len(responses)), 3)) == rest(base)
        queues = {f: [c for c in responses if c["fork"] == f] for f in dict.fromkeys(forks)}
        interleaved = [queues[f].pop(0) for f in rng.sample(forks, len(forks))]
        assert score.problem_metrics(interleaved, 3) == base
        plain = graded([rng.choice(pool) for _ in range(8)], gold)
        base = score.problem_metrics(plain, 4)
        assert rest(score.problem_metrics(rng.sample(plain, len(plain)), 4)) == rest(base)
        sets = [plain[0:4], plain[4:8]]
        assert native(score.problem_metrics([c for s in sets for c in rng.sample(s, 4)], 4)) == native(base)


def test_cons_at_k_is_the_expected_vote_over_which_responses_each_token_gives():
    """k < n: the mean over every subset the tokens can give (enumerated here) of majority_vote;
    k = n: majority_vote of all the responses."""
    forks = ["<think1>"] * 3 + ["<think2>"] * 3
    responses = graded(["7", "7", "5", "5", "8", None], "7", forks)
    subsets = [[a, b] for a in responses[:3] for b in responses[3:]]  # cons@2: one of each token
    exact = sum(score.majority_vote(s) for s in subsets) / len(subsets)
    assert score.cons_at_k(responses, 2) == pytest.approx(exact)
    assert score.cons_at_k(responses, 6) == score.majority_vote(responses)
    plain = graded(["7", "5", "5", "7", "8"], "7")
    exact = sum(score.majority_vote(list(s)) for s in itertools.combinations(plain, 3)) / 10
    assert score.cons_at_k(plain, 3) == pytest.approx(exact)
    many = graded(["7", "5", "5", "7", "8", None] * 4, "7")  # C(24, 12) subsets: drawn, not enumerated
    assert score.cons_at_k(many, 12) == pytest.approx(score.cons_at_k(many, 12, draws=4000), abs=0.05)


def test_the_expected_cons_at_k_is_the_paper_s_vote_averaged_over_the_responses_each_token_gives():
    """cons_at_k_first is the paper's Cons@k: the majority vote of the first k responses in turn over the
    tokens. Reordering each token's responses changes which k come first; cons_at_k is the mean of
    cons_at_k_first over every such reordering (here enumerated: every permutation within each token),
    and --cons first scores with the plain vote."""
    forks = ["<think1>", "<think2>", "<think3>"] * 3
    responses = graded(["7", "5", "5", "7", "8", None, "5", "7", "7"], "7", forks)
    by_fork = [[c for c in responses if c["fork"] == f] for f in ("<think1>", "<think2>", "<think3>")]
    for k in (2, 3, 4, 5, 7, 9):
        firsts = [score.cons_at_k_first([c for turn in zip(*orders) for c in turn], k)
                  for orders in itertools.product(*(itertools.permutations(mine) for mine in by_fork))]
        assert score.cons_at_k(responses, k) == pytest.approx(sum(firsts) / len(firsts)), k
        assert len(set(firsts)) > 1 or k == 9  # the plain vote depends on the order, the expected one does not
    assert score.cons_at_k_first(responses, 9) == score.majority_vote(responses)
    ks = [2, 3, 4, 5]
    first, expected = (score.problem_metrics(responses, 3, ks=ks, cons=c) for c in ("first", "expected"))
    assert all(first[f"cons@{k}"] == score.cons_at_k_first(responses, k) for k in ks)
    assert all(expected[f"cons@{k}"] == score.cons_at_k(responses, k) for k in ks)
    assert any(first[f"cons@{k}"] != expected[f"cons@{k}"] for k in ks)


def test_cons_at_k_takes_the_tokens_in_tag_order():
    forks = ["<think10>", "<think2>", "<think1>", "<think10>", "<think2>", "<think1>"]
    responses = graded(["1", "2", "3", "1", "2", "3"], "3", forks)
    assert [c["fork"] for c in score.in_turn(responses)][:3] == ["<think1>", "<think2>", "<think10>"]
    assert score.problem_metrics(responses, 3)["cons@2"] == 0.5  # <think1>'s 3 and <think2>'s 2 tie


def test_choice_rows_vote_over_letters(tmp_path):
    rows = [{"id": "q", "kind": "choice", "gold": "B",
             "completions": texts("Answer: A", "Answer: B", "answer is (B)", "no idea")}]
    m = score.main(score.parse_config([write_rows(tmp_path / "gpqa.jsonl", rows), "--set_size", "2"]))
    assert m["pass@1"] == 0.5 and m["cons@4"] == 1.0 and m["unparseable"] == 0.25
    assert m["cons@2"] == pytest.approx((0.5 + 0.5 + 0 + 1 + 1 + 1) / 6)  # AB AB A- BB B- B-: A-B ties are worth 0.5


# ----------------------------------------------------------------------------- rows files and metrics

def test_scoring_regrades_stored_verdicts(tmp_path):
    stale = [{"text": r"\boxed{3}", "pred": "5", "correct": False}, {"text": r"\boxed{5}", "pred": "3", "correct": True}]
    path = write_rows(tmp_path / "graded.jsonl", [{"id": 0, "gold": "3", "completions": stale}])
    rows = evalfiles.read_rows(path)
    assert [(c["pred"], c["correct"]) for c in rows[0]["completions"]] == [("3", True), ("5", False)]
    first = score.main(score.parse_config([path]))
    assert score.main(score.parse_config([path])) == first and first["cons@2"] == 0.5  # a tie: 3 right, 5 wrong


def test_ragged_rows_average_each_metric_over_the_problems_that_have_it(tmp_path):
    rows = [{"id": "full", "gold": "7", "completions": texts(*[r"\boxed{7}"] * 4)},
            {"id": "short", "gold": "7", "completions": texts(r"\boxed{1}", r"\boxed{7}")}]
    m = score.main(score.parse_config([write_rows(tmp_path / "r.jsonl", rows), "--set_size", "2"]))
    assert m["cons@4"] == 1.0 and m["counts"]["cons@4"] == 1 and m["pass@4"] == 1.0
    assert m["pass@1"] == pytest.approx((1 + 0.5) / 2) and m["counts"]["pass@1"] == 2
    assert m["cons@2"] == (1 + 0.5) / 2 and m["counts"]["cons@2"] == 2  # 1 and 7 tie: worth 0.5
    assert "cons@2" in json.load(open(tmp_path / "r.metrics.json"))


def test_ragged_warning_names_the_short_problems(tmp_path, capsys):
    rows = [{"id": "full", "gold": "7", "completions": texts(*[r"\boxed{7}"] * 4)},
            {"id": "short-one", "gold": "7", "completions": texts(r"\boxed{7}")}]
    score.main(score.parse_config([write_rows(tmp_path / "r.jsonl", rows)]))
    err = capsys.readouterr().err
    assert "warning" in err and "short-one" in err and "full" not in err.split("(")[1]


def test_duplicate_ids_and_empty_golds_name_the_line(tmp_path):
    one = {"id": "a", "gold": "1", "completions": texts(r"\boxed{1}")}
    with pytest.raises(score.DataError, match=r"dup.jsonl:3: duplicate id 'a' \(first on line 1\)"):
        evalfiles.read_rows(write_rows(tmp_path / "dup.jsonl", [one, {**one, "id": "b"}, one]))
    for gold in (None, "", "  "):
        with pytest.raises(score.DataError, match="gold.jsonl:2: the gold answer is empty"):
            evalfiles.read_rows(write_rows(tmp_path / "gold.jsonl", [one, {**one, "id": "b", "gold": gold}]))
    with pytest.raises(score.DataError, match="kind.jsonl:1: a choice row needs a gold letter"):
        evalfiles.read_rows(write_rows(tmp_path / "kind.jsonl", [{**one, "kind": "choice", "gold": "42"}]))


def test_unfinished_responses_are_graded_by_their_rule_and_finished_must_be_a_bool(tmp_path):
    """infer.py marks a response cut at --max_new_tokens "finished": false: it is read only after a
    </think> and without its last line (docs/grading.md); a file without the mark is read as finished."""
    cut = "So 3 + 4 = 7 and the answer is \\boxed{7}.\nLet me double-check"
    rows = [{"id": 0, "gold": "7", "completions": [{"text": cut, "finished": False}, {"text": cut, "finished": True},
                                                   {"text": cut}, {"text": "</think>\n\n" + cut, "finished": False}]}]
    graded_rows = evalfiles.read_rows(write_rows(tmp_path / "cut.jsonl", rows))
    assert [c["pred"] for c in graded_rows[0]["completions"]] == [None, "7", "7", "7"]
    rows[0]["completions"][0]["finished"] = "no"
    with pytest.raises(score.DataError, match=r"cut.jsonl:1: 'finished' must be true or false"):
        evalfiles.read_rows(write_rows(tmp_path / "cut.jsonl", rows))


def test_a_number_copied_from_the_rows_question_is_no_answer(tmp_path):
    question = "Tom has 5 apples. He gives 2 away and gets 2 back. How many apples does he have?"
    texts_ = texts("Tom starts with \\boxed{5} apples.", "He has 5 - 2 + 2 = 5 apples: \\boxed{5}.")
    rows = [{"id": 0, "gold": "5", "prompt": question, "completions": texts_},
            {"idx": 1, "gt": "5", "question": question, "response": [c["text"] for c in texts_]}]
    graded_rows = evalfiles.read_rows(write_rows(tmp_path / "copied.jsonl", rows))
    assert [[c["correct"] for c in r["completions"]] for r in graded_rows] == [[False, True], [False, True]]


def test_the_metrics_file_names_the_grader(tmp_path, monkeypatch):
    path = write_rows(tmp_path / "r.jsonl", [{"gold": "1", "completions": texts(r"\boxed{1}")}])
    assert "math-verify" in score.main(score.parse_config([path]))["grader"]
    assert json.load(open(tmp_path / "r.metrics.json"))["grader"].startswith("math-verify 0.")
    monkeypatch.setattr(grader, "use_math_verify", False)
    assert score.main(score.parse_config([path]))["grader"] == "built-in"


def test_the_printed_table_and_the_metrics_file_name_the_cons_at_k_vote(tmp_path, capsys):
    """The default Cons@k is the expected vote, not the paper's first k: the table's header says
    which one it printed, and the metrics file records it."""
    path = write_rows(tmp_path / "r.jsonl", [{"gold": "1", "completions": texts(r"\boxed{1}")}])
    for cons, said in (("expected", "cons@k: the vote expected"), ("first", "the paper's vote of the first k")):
        m = score.main(score.parse_config([path, "--cons", cons]))
        header = capsys.readouterr().out.splitlines()[0]
        assert said in header and m["cons"] == cons, header


def test_native_sets_of_block_order_are_the_authors_sets(tmp_path):
    num_forks, per_fork = 3, 4  # S = 4: token k answers responses 4k .. 4k + 3
    forks = [f"<think{k + 1}>" for k in range(num_forks) for _ in range(per_fork)]
    completions = [{"text": rf"\boxed{{{i}}}", "fork": f} for i, f in enumerate(forks)]
    path = write_rows(tmp_path / "block.jsonl", [{"gold": "0", "tag_order": "block", "completions": completions}])
    rows = evalfiles.read_rows(path)
    sets = score.native_sets(rows[0]["completions"], 6, "block")
    got = [[int(c["pred"]) for c in s] for s in sets]
    assert got == [[s + k * per_fork for k in range(num_forks)] for s in range(per_fork)]
    # without forks, a block row is split the authors' way: 10 over 3 tokens -> blocks of 4, 3, 3
    plain = [{"pred": str(i), "fork": None} for i in range(10)]
    assert [[int(c["pred"]) for c in s] for s in score.native_sets(plain, 3, "block")] == [[0, 4, 7], [1, 5, 8], [2, 6, 9]]
    assert [[int(c["pred"]) for c in s] for s in score.native_sets(plain, 3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


# ----------------------------------------------------------------------------- layouts and real labelled files

def test_each_layout_is_read_per_row_and_an_unknown_one_names_its_line(tmp_path, monkeypatch):
    rows = [{"id": "a", "gold": "7", "completions": texts(r"\boxed{7}", r"\boxed{8}")},
            {"idx": "b", "gt": "7", "response": [r"\boxed{7}", "so 7"], "score": [True, False]},
            {"ground_truth": "so 3 + 4 = 7\n#### 7", "m1": {"solution": "7 in all.\nA: 7", "is_correct": True},
             "m2": {"solution": "A: 6", "is_correct": False}}]
    path = write_rows(tmp_path / "mixed.jsonl", rows)
    graded_rows = evalfiles.read_rows(path)
    assert [r["id"] for r in graded_rows] == ["a", "b", 3]
    assert [[c["correct"] for c in r["completions"]] for r in graded_rows] == [[True, False], [True, True], [True, False]]
    monkeypatch.chdir(tmp_path / "..")
    m = score.main(score.parse_config([path, "--set_size", "2"]))
    assert m["pass@1"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3) and m["label_agreement"] == pytest.approx(3 / 4)
    assert os.path.exists("eval/mixed.metrics.json") and not os.path.exists(tmp_path / "mixed.metrics.json")
    bad = write_rows(tmp_path / "bad.jsonl", [rows[0], {"question": "q", "answers": ["7"]}])
    with pytest.raises(score.DataError, match=r"bad.jsonl:2: unknown layout"):
        evalfiles.read_rows(bad)


def test_math_cot_scored_directly_matches_the_datasets_labels(tmp_path):
    m = score.main(score.parse_config([shared_data("math_cot_100x8.jsonl"), "--set_size", "8",
                                       "--out", str(tmp_path / "m.json")]))
    assert m["pass@1"] == pytest.approx(0.91125) and m["label_agreement"] >= 0.9987 and m["responses"] == 800


def test_gsm8k_model_solutions_scored_directly_match_their_labels(tmp_path):
    m = score.main(score.parse_config([shared_data("gsm8k_test_4models.jsonl"), "--set_size", "4",
                                       "--out", str(tmp_path / "m.json")]))
    assert m["pass@1"] == pytest.approx(2001 / 5276) and m["label_agreement"] == 1.0 and m["problems"] == 1319


def test_responses_whose_tags_the_model_chose_have_no_native_sets():
    """infer.py --fork auto rows (fork_policy): the tags follow the model's choice, not one per token."""
    forks = ["<think3>"] * 5 + ["<think4>"]
    chosen = {"id": 0, "fork_policy": {"<think3>": 0.9, "<think4>": 0.1}, "completions": graded(["7"] * 6, "7", forks)}
    forced = {"id": 1, "completions": graded(["7"] * 6, "7", forks)}
    assert not [k for k in score.aggregate([chosen], set_size=6) if k.startswith("native_cons@")]
    assert [k for k in score.aggregate([forced], set_size=6) if k.startswith("native_cons@")]


# ----------------------------------------------------------------------------- votes and metrics on hand-built responses

def responses(preds, gold="7", forks=None):
    return [{"pred": p, "correct": grader.is_equiv(p, gold), "fork": f, "text": f"\\boxed{{{p}}}" if p else "?"}
            for p, f in zip(preds, forks or [None] * len(preds))]


def test_majority_vote_tie_is_worth_the_mean_of_the_tied_answers():
    assert score.majority_vote(responses(["5", "7", "7", "5"])) == 0.5  # 2-2 tie, whatever came first
    assert score.majority_vote(responses(["7", "5", "5", "7"])) == 0.5
    assert score.majority_vote(responses(["7.0", "5", "7", "5", "5"])) == 0.0  # 7.0 and 7 are one answer: 2-3
    assert score.majority_vote(responses(["7.0", "5", "7"])) == 1.0


def test_unparseable_answers_never_vote_and_alone_are_wrong():
    assert score.majority_vote(responses([None, None, "7"]))
    assert not score.majority_vote(responses([None, None, None]))
    m = score.problem_metrics(responses([None, None, "7"]), set_size=3)
    assert m["pass@1"] == pytest.approx(1 / 3) and m["cons@3"] == 1.0


def test_all_wrong_scores_zero_and_k_equal_n():
    m = score.problem_metrics(responses(["1", "2", "3", "4"]), set_size=2)
    assert all(v == 0 for v in m.values())
    m = score.problem_metrics(responses(["1", "2", "7", "4"]), set_size=2)
    assert m["pass@4"] == 1.0 and m["pass@1"] == 0.25 and m["cons@4"] == 0.25  # 4-way tie, one right
    assert set(m) == {"pass@1", "pass@2", "pass@3", "pass@4", "cons@2", "cons@4", "native_cons@2"}


def test_unbiased_pass_at_k_equals_bruteforce_over_k_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert score.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_native_sets_use_every_forking_token_once_whatever_the_row_order():
    forks = [f for _ in range(3) for f in data.fork_tokens(4)][:10]  # 3, 3, 2, 2 per token
    rows = responses([str(i) for i in range(10)], forks=forks)
    random.Random(0).shuffle(rows)
    sets = score.native_sets(rows, set_size=6)
    assert len(sets) == 2 and all(sorted(c["fork"] for c in s) == data.fork_tokens(4) for s in sets)
    assert [len(s) for s in score.native_sets(responses(["1"] * 13), set_size=6)] == [6, 6]  # baseline


def test_aggregate_on_hand_built_problems():
    forks = data.fork_tokens(2) * 2  # <think1>, <think2>, <think1>, <think2>
    rows = [{"completions": responses(["7", "7", "3", None], forks=forks)},  # sets (7, 7) and (3, None)
            {"completions": responses(["1", "7", "2", "2"], forks=forks)}]   # sets (1, 7): a tie; (2, 2)
    m = score.aggregate(rows, set_size=6)
    assert m["pass@1"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # cons@2: one response of each token, every pair equally likely: (7,7) 1, (7,-) 1, (3,7) 0.5, (3,-) 0 -> 0.625;
    # (1,7) 0.5, (1,2) 0, (2,7) 0.5, (2,2) 0 -> 0.25. cons@4, all four: [7,3,7,-] -> 7, [1,7,2,2] -> 2
    assert m["cons@2"] == pytest.approx((0.625 + 0.25) / 2) and m["cons@4"] == 0.5
    assert m["native_cons@2"] == pytest.approx((1 / 2 + 0.5 / 2) / 2)
    assert m["pass@4"] == 1.0 and m["unparseable"] == 1 / 8
    assert m["per_fork"]["<think1>"]["accuracy"] == 1 / 4 and m["per_fork"]["<think2>"]["accuracy"] == 2 / 4


def test_score_reextracts_answers_from_text_and_gold(tmp_path):
    forks = data.fork_tokens(2) * 2
    texts = [r"\boxed{13}", r"\boxed{12}", "none", r"\boxed{12.0}"]
    rows = [{"id": 0, "gold": "#### 12", "completions": [{"fork": f, "text": t} for f, t in zip(forks, texts)]},
            {"id": 1, "gold": r"\frac{1}{2}", "completions": [{"fork": f, "text": r"so \boxed{0.5}."} for f in forks]}]
    path = tmp_path / "vllm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = score.main(score.parse_config([str(path)]))
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 1) / 2) and metrics["cons@4"] == 1.0
    # cons@2, one response of each token: (13, 12) and (13, 12.0) ties worth 0.5, (none, 12) and (none, 12.0) right
    assert metrics["cons@2"] == pytest.approx((0.75 + 1) / 2)
    assert metrics["native_cons@2"] == pytest.approx(((0.5 + 1) / 2 + 1) / 2)  # sets (13, 12) and (none, 12.0)
    assert json.load(open(tmp_path / "vllm.metrics.json")) == metrics
