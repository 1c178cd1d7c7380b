"""Tests of toy.py's experiment: the style recogniser, the metrics, and a reduced `python toy.py
compare` (one seed, hungarian and random only) that must show the mechanism of Section 3.3.

    python -m pytest -q test_toy.py          # ~1.5 minutes on 2 CPU cores, almost all of it the last test
"""
import pytest

import toy


def test_recognise_finds_the_style_of_every_trace_and_its_answer():
    for q in toy.make_questions(50, seed=7):
        for style, trace in zip(q["sources"], q["traces"]):
            assert toy.recognise(trace) == style
            assert toy.answer_of(trace) == q["answer"]


@pytest.mark.parametrize("text", [
    "Left to left: 12+34=46, 46+56=102. The answer is \\boxed{102}.",  # a blend of two styles
    "Left to right: 12+34=46, 46+56=102.",  # no answer
    "By place value: ones 2+4+6=12. The answer is \\boxed{102}.",  # a step missing
    "The answer is \\boxed{102}.", ""])
def test_recognise_calls_broken_traces_other(text):
    assert toy.recognise(text) == "other"


def record(fork, style, pred, question=0, rnd=0, gold="7"):
    return {"question": question, "round": rnd, "fork": fork, "style": style, "pred": pred, "gold": gold}


def test_summarise_purity_distinct_styles_and_votes():
    records = [record("<think1>", "left", "7", question=0), record("<think1>", "left", "1", question=1),
               record("<think1>", "other", None, question=2), record("<think1>", "right", "7", question=3),
               record("<think2>", "other", "7", question=0), record("<think2>", "other", "7", question=1),
               record("<think2>", "place", "2", question=2), record("<think2>", "place", "7", question=3)]
    s = toy.summarise(records)
    assert s["per_fork"]["<think1>"]["majority"] == "left" and s["per_fork"]["<think1>"]["purity"] == 0.5
    # "other" is never a majority style, however frequent
    assert s["per_fork"]["<think2>"]["majority"] == "place" and s["per_fork"]["<think2>"]["purity"] == 0.5
    assert s["purity"] == 0.5 and s["distinct_styles"] == 2
    assert s["pass@1"] == (2 / 4 + 3 / 4) / 2
    # votes per question: 7|7 right, 1|7 tie -> first seen (1) wrong, None|2 wrong, 7|7 right
    assert s["cons@N"] == 0.5


def test_forking_tokens_specialise_under_hungarian_but_not_under_random_matching(tmp_path):
    """The end-to-end check of train.py's cost matrix, matching and loss masking: under Hungarian
    matching each forking token starts its own style; under random matching the tokens are
    interchangeable and each samples the data's mix of styles."""
    cfg = toy.CompareConfig(out_dir=str(tmp_path), variants="hungarian,random", seeds=1, epochs=10,
                            eval_questions=20)  # 160 steps of 4 questions; 128 steps is not always enough
    summary = toy.compare(cfg)
    hungarian, random = summary["hungarian"], summary["random"]
    assert hungarian["distinct_styles"] >= 3 and hungarian["purity"] >= 0.85, hungarian["runs"][0]["sampled"]
    assert random["purity"] <= hungarian["purity"] - 0.2, random["runs"][0]["sampled"]
    # Figure 7: only SSFT concentrates the optimal configurations
    assert hungarian["runs"][0]["configurations"]["distinct"][-1] < random["runs"][0]["configurations"]["distinct"][-1]
