"""The method's end-to-end tests on the toy: SSFT's tags specialise and answer held-out questions well
above chance; the toy comparison's metrics and figure; and the project's layout (stages import
downward, plumbing imports no stage; every script refuses an abbreviated flag). The tests of each
part are in tests/.

    python -m pytest -q test_ssft.py
"""
import json
import os
import sys

import pytest

import data
import score
import select_token
import toy
import toy_compare
import train
from plumbing import figures, flags, grader

from conftest import HERE


# ----------------------------------------------------------------------------- layout of the project

SCRIPTS = {"train", "infer", "select_token", "gfpo"}  # stages run as scripts: nothing but a test imports them
LIBRARY_STAGES = {"data", "match", "policy", "score", "toy"}  # stages whose functions other stages call
# tools that measure a script stage's own functions, as a test would (off every stage's path)
MEASURES_A_STAGE = {"tools.profile_real": {"train"}}


def project_imports():
    """{file: the project modules it imports, at any depth in the file}: the stages and toy.py at the
    top level, plumbing/<name> as "plumbing.<name>", tools/<name> as "tools.<name>"."""
    import ast
    files = {f[:-3]: f for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith(("test_", "conftest"))}
    for folder in ("plumbing", "tools"):
        files.update({f"{folder}.{f[:-3]}": os.path.join(folder, f) for f in os.listdir(os.path.join(HERE, folder))
                      if f.endswith(".py") and f != "__init__.py"})
    graph = {}
    for m, path in files.items():
        tree = ast.parse(open(os.path.join(HERE, path)).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom) and n.module == "plumbing":
                names |= {f"plumbing.{a.name}" for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:
                names.add(n.module)
        graph[m] = names & set(files) - {m}
    return graph


def test_stages_import_downward_only():
    """No import circle; plumbing imports no stage (it is the small boring library under them); a
    script stage (train, infer, select_token, gfpo) is imported by no other file, tests aside (and
    the profile of train.py's own step), so that a stage file is never a library for another stage;
    decoding lives in plumbing/decoding.py."""
    graph = project_imports()

    def reach(m, seen=()):
        return set().union(*({n} | reach(n, seen + (m,)) for n in graph[m] if n not in seen)) if graph[m] else set()
    for m in graph:
        assert m not in reach(m), f"{m} imports itself through {graph[m]}"
    stages = SCRIPTS | LIBRARY_STAGES
    assert stages <= set(graph), stages - set(graph)
    for m in graph:
        if m.startswith("plumbing."):
            assert not graph[m] & stages, f"plumbing file {m} imports the stage(s) {graph[m] & stages}"
        scripts = graph[m] & SCRIPTS - MEASURES_A_STAGE.get(m, set())
        assert not scripts, f"{m} imports the script stage(s) {scripts}"
    assert graph["toy"] == set() and graph["score"] <= {"plumbing." + p for p in ("evalfiles", "files", "flags", "grader", "score_report", "votes")}


@pytest.mark.parametrize("parse, argv, full", [
    (lambda argv: train.parse_config(argv), ["--max_step", "10"], "--max_steps"),
    (lambda argv: score.parse_config(argv), ["rows.jsonl", "--set", "4"], "--set_size"),
    (lambda argv: data.main(["mix", *argv]), ["--pool", "a.jsonl", "--trace", "2"], "--traces"),
    (lambda argv: flags.parse_flags(toy_compare.Config, "", argv), ["--seed=5"], "--seeds"),
], ids=["train", "score", "data-mix", "toy_compare"])
def test_an_abbreviated_flag_is_refused_and_the_full_name_suggested(parse, argv, full, capsys):
    """argparse would take --max_step as --max_steps (any unique prefix), so that a typo silently
    changes a run; every script's flags come from flags.parse_flags, which refuses it."""
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # the usage above it lists every flag
    assert "unrecognized arguments" in error and f"did you mean {full}" in error, error


# ----------------------------------------------------------------------------- match.py

# ----------------------------------------------------------------------------- data.py

# ----------------------------------------------------------------------------- train.py

# ----------------------------------------------------------------------------- concat layout (A.5)

# ----------------------------------------------------------------------------- toy.py: the mechanism (Section 3.3)

def test_recognise_finds_the_style_of_every_trace_and_its_answer():
    for q in toy.make_questions(50, seed=7):
        for style, trace in zip(q["sources"], q["traces"]):
            assert toy.recognise(trace) == style
            assert grader.last_boxed(trace) == q["answer"]


@pytest.mark.parametrize("text", [
    "Left to left: 12+34=46, 46+56=102. The answer is \\boxed{102}.",  # a blend of two styles
    "Left to right: 12+34=46, 46+56=102.",  # no answer
    "By place value: ones 2+4+6=12. The answer is \\boxed{102}.",  # a step missing
    "The answer is \\boxed{102}.", ""])
def test_recognise_calls_broken_traces_other(text):
    assert toy.recognise(text) == "other"


def test_run_metrics_on_a_hand_made_run(tmp_path):
    """purity, distinct styles, Pass@1 of the Eq. 6 token and cons@k in turn over the tokens, from
    the files a run leaves: eval.jsonl (infer.py's rows), select_token.json, metrics and matching."""
    left, place, direct = (toy.solve([10, 11, 12], s) for s in ("left", "place", "direct"))
    wrong = direct.replace("{33}", "{34}")
    forks = ["<think1>", "<think2>"] * 2
    rows = [{"id": 0, "gold": "33", "completions": [{"fork": f, "text": t, "tokens": 5}
                                                    for f, t in zip(forks, [left, place, left, wrong])]},
            {"id": 1, "gold": "33", "completions": [{"fork": f, "text": t, "tokens": 5}
                                                    for f, t in zip(forks, [wrong, wrong, direct, "garbage"])]}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0, "gap": 0.5}) + "\n")
    configurations = [{"edges": [[1, "left"], [0, "place"]], "count": 3}, {"edges": [[1, "place"]], "count": 2}]
    (tmp_path / "matching.json").write_text(json.dumps({"fork_tokens": forks[:2], "epochs": [
        {"epoch": 0, "configurations": configurations}]}))  # Eq. 6: <think2> reaches 2 sources, <think1> 1
    select_token.main(select_token.parse_config(["--out_dir", str(tmp_path)]))  # as the run does: select_token.json
    m = toy_compare.run_metrics("hungarian", str(tmp_path), max_k=4)
    # <think1>: left, left, direct, direct -> majority left (2 of 4); <think2>: place, direct, direct, other
    assert m["per_token"]["<think1>"]["majority"] == "left" and m["per_token"]["<think1>"]["purity"] == 0.5
    assert m["per_token"]["<think2>"]["majority"] == "direct" and m["per_token"]["<think2>"]["purity"] == 0.5
    assert m["distinct_styles"] == 2 and m["purity"] == 0.5
    assert m["pass@1"] == 4 / 8 and m["pass@1_selected"] == 1 / 4  # <think2> is right once: place
    # cons@1: one response of <think1>, the first token, in expectation: its accuracy (problem 0: 2 of 2, 1: 1 of 2);
    # cons@4, all four: problem 0: 33 wins; problem 1: 34 (two) beats 33
    assert m["cons@1"] == 0.75 and m["cons@4"] == 0.5
    assert m["selected"] == "<think2>" and m["configurations"] == [2] and m["gap"] == [0.5]
    half = toy_compare.over_seeds([0.2, 0.4, 0.6])
    assert half["mean"] == pytest.approx(0.4) and half["ci95"] == pytest.approx(4.303 * 0.2 / 3 ** 0.5, rel=1e-3)


def test_every_figure_gives_one_colour_to_one_meaning():
    """Variants, styles and select_token.py's edge and curve colours never share a colour, and every
    variant and style toy_compare.py draws has its own."""
    tables = [toy_compare.VARIANT_COLOURS, toy_compare.STYLE_COLOURS, toy_compare.GFPO_COLOURS, figures.COLOURS]
    colours = [c for table in tables for c in table.values()]
    assert len(colours) == len(set(colours)), tables
    assert set(toy_compare.Config.variants.split(",")) <= set(toy_compare.VARIANT_COLOURS)
    assert set(toy.STYLES + ["other"]) == set(toy_compare.STYLE_COLOURS)


def test_toy_compare_reuses_only_finished_runs_and_only_when_asked(tmp_path):
    (tmp_path / "eval.metrics.json").write_text("{}")
    reuse, fresh = toy_compare.Config(reuse=True), toy_compare.Config()
    assert toy_compare.finished(str(tmp_path), ["eval"], reuse)
    assert not toy_compare.finished(str(tmp_path), ["eval"], fresh)  # by default every run is redone
    assert not toy_compare.finished(str(tmp_path), ["eval", "own"], reuse)  # its own-tag answers missing


def test_toy_compare_redraws_its_figure_from_a_saved_summary(tmp_path, run):
    """--plot_only draws toy_compare.png from summary.json alone, running nothing."""
    over = toy_compare.over_seeds
    styles = {s: 0.25 for s in toy.STYLES} | {"other": 0.0}
    runs = [{"per_token": {t: {"styles": styles} for t in ("<think1>", "<think2>")}, "configurations": [9, 7, 7],
             "gap": [None, 0.1, 0.3, 0.5]} for seed in (0, 1)]
    variant = {**{f"pass@{k}": over([0.3 * k, 0.3 * k + 0.1]) for k in (1, 2)},
               "per_token": {t: {"accuracy": over([0.4, 0.5]), "mean_tokens": over([20, 30])} for t in ("<think1>", "<think2>")},
               "runs": runs}
    (tmp_path / "summary.json").write_text(json.dumps({"config": {"samples": 2},
                                                       "variants": {"hungarian": variant, "random": variant}}))
    done = run([sys.executable, "tools/toy_compare.py", "--plot_only", "--out_dir", str(tmp_path)], timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "toy_compare.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "runs").exists()
    done = run([sys.executable, "tools/toy_compare.py", "--plot_only", "--out_dir", str(tmp_path / "none")], timeout=60)
    assert done.returncode == 1 and "summary.json: cannot read" in done.stderr


def test_hungarian_tokens_specialise_and_answer_held_out_questions_well_above_chance(tmp_path):
    """toy_compare.py reduced to one seed of SSFT and 375 steps: train.py, select_token.py, infer.py
    and score.py end to end. Each forking token starts its own style, and the held-out accuracy is
    learned: chance, a uniform guess among the 58 possible sums, is 0.017."""
    cfg = toy_compare.Config(out_dir=str(tmp_path), variants="hungarian", seeds=1, epochs=3, eval_questions=50,
                             samples=8, jobs=1, gfpo=False)  # GFPO's own runs: test_gfpo.py
    summary = toy_compare.compare(cfg)["variants"]["hungarian"]
    run = summary["runs"][0]
    assert summary["distinct_styles"]["mean"] >= 3 and summary["purity"]["mean"] >= 0.85, run["per_token"]
    assert summary["pass@1"]["mean"] >= 0.1, run["per_token"]
    assert (tmp_path / "summary.json").exists() and (tmp_path / "toy_compare.png").read_bytes()[:4] == b"\x89PNG"

