"""The real-model run's data and measurements without a model: tools/gsm8k_styles.py renders every GSM8K
question in four styles that say the same arithmetic, and tools/specialisation.py's purity, chance level
and style reader."""
import contextlib
import io
import json
import os
import re

import numpy as np
import pytest

import gsm8k_styles
import specialisation

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = {"question": "Janet's ducks lay 16 eggs per day. She eats three and bakes with four. She sells the rest "
                   "for $2 each. How much does she make?",
       "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                 "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"}


def committed(name):
    return [r for r in map(json.loads, open(os.path.join(HERE, "data", f"gsm8k_styles.{name}.jsonl")))]


def test_every_style_says_the_same_arithmetic_and_ends_with_the_gold_answer():
    for q in committed("train")[:60] + [gsm8k_styles.render(ROW)]:
        by = dict(zip(q["sources"], q["traces"]))
        assert sorted(by) == sorted(gsm8k_styles.STYLES)
        for trace in q["traces"]:
            assert trace.endswith(f"\nAnswer: {q['answer']}") and "<<" not in trace
        for line in by["equations"].splitlines()[:-1]:  # each line: expression = its value
            lhs, rhs = line.rsplit(" = ", 1)
            assert abs(eval(lhs) - float(rhs)) <= 1e-4 * max(1, abs(float(rhs))), line
        program = re.search(r"```python\n(.*)```", by["python"], re.S).group(1)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(program, {})  # the program computes the gold answer from the givens
        assert abs(float(printed.getvalue()) - float(q["answer"])) < 1e-6, program
        assert by["backward"].startswith("We need ") and f"= {q['answer']}.\nAnswer:" in by["backward"]


def test_a_note_that_does_not_evaluate_to_its_result_or_miss_the_answer_is_refused():
    for answer in ["It is 2+2=<<2+2=5>>5\n#### 5", "No notes here\n#### 4", "2*3=<<2*3=6>>6\n#### 7",
                   "x=<<import os=0>>0\n#### 0"]:
        with pytest.raises((ValueError, SyntaxError)):
            gsm8k_styles.render({"question": "q", "answer": answer})


def test_the_style_reader_gives_back_each_trace_source():
    for q in committed("train") + committed("heldout"):
        assert [specialisation.style_of(t) for t in q["traces"]] == q["sources"], q["prompt"][:60]


def test_held_out_questions_are_never_trained_on_and_sources_are_shuffled():
    train, held = committed("train"), committed("heldout")
    assert not {q["id"] for q in train} & {q["id"] for q in held} and len(held) == 100
    assert not {q["prompt"] for q in train} & {q["prompt"] for q in held}
    orders = {tuple(q["sources"]) for q in train}
    assert len(orders) > 12 and all(sorted(o) == sorted(gsm8k_styles.STYLES) for o in orders)


@pytest.mark.skipif(not os.path.exists(os.path.join(HERE, "..", "shared", "data", "gsm8k_test.jsonl")),
                    reason="needs ../shared/data/gsm8k_test.jsonl (python tools/get_data.py)")
def test_committed_files_are_what_the_maker_writes(tmp_path):
    gsm8k_styles.main(["--gsm8k", os.path.join(HERE, "..", "shared", "data", "gsm8k_test.jsonl"),
                       "--out", str(tmp_path / "g")])
    for name in ("train", "heldout"):
        made = (tmp_path / f"g.{name}.jsonl").read_text()
        assert made == open(os.path.join(HERE, "data", f"gsm8k_styles.{name}.jsonl")).read()


def test_purity_and_its_chance_level():
    assert specialisation.purity([[5, 0], [0, 5]]) == (1.0, [1.0, 1.0])
    assert specialisation.purity([[3, 1], [0, 0]]) == (0.75, [0.75, None])
    styles = list(gsm8k_styles.STYLES)
    questions = [styles] * 400  # every question has one trace per source, as the run's data
    mean, p95 = specialisation.chance_purity(questions, 4, styles, sims=300)
    assert 0.25 < mean < p95 < 0.30  # 100 draws per tag from 4 sources: the top share is a little over 1/4
    one = specialisation.chance_purity([styles] * 2, 4, styles, sims=300)[0]
    assert one > mean  # few questions: chance is far above 1/4, why it is simulated at the run's sizes
    counts = specialisation.edge_counts({"edges": [{"fork": 0, "trace": 1, "source": "python", "count": 3}]},
                                        ["<think1>", "<think2>"], styles)
    assert counts[0, styles.index("python")] == 3 and counts.sum() == 3


def test_held_out_cost_tables_count_the_optimal_matching_by_source():
    sources = ["a", "b"]
    costs = np.array([[[0.1, 0.9], [0.8, 0.2]], [[0.9, 0.1], [0.2, 0.8]]])  # question 2 lists its traces b, a
    tables = specialisation.cost_tables(costs, [["a", "b"], ["b", "a"]], sources)
    assert tables["optimal_counts"] == [[2, 0], [0, 2]]
    assert np.allclose(tables["mean_cost"], [[0.1, 0.9], [0.8, 0.2]])
    assert np.isclose(tables["spread_over_tags"], 0.7) and np.isclose(tables["spread_over_traces"], 0.7)
