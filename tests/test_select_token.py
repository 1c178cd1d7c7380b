"""Tests of select_token.py: Eq. 6 with its tie-breaks, the printed table and the figures it draws.
CPU, seconds.
"""
import json

import pytest

import data
import select_token


def write_matching(out_dir, epochs):
    out_dir.mkdir(exist_ok=True)
    log = {"matching": "hungarian", "num_forks": 3, "fork_tokens": data.fork_tokens(3),
           "epochs": [{"epoch": i, "steps": 1, "mean_gap": 0.0, "edges": [],
                       "configurations": [{"edges": e, "count": n} for e, n in configs]}
                      for i, configs in enumerate(epochs)]}
    (out_dir / "matching.json").write_text(json.dumps(log))


def test_select_token_breaks_a_coverage_tie_by_weighted_degree(tmp_path):
    early = [([[0, "a"], [1, "b"]], 50), ([[0, "b"], [1, "a"]], 50), ([[0, "c"], [2, "a"]], 50)]
    late = [([[1, "a"], [2, "b"]], 6),  # <think2> and <think3> both reach 2 sources: a, b ...
            ([[1, "b"], [2, "a"]], 3),  # ... <think2> with weight 6 + 3, <think3> with 6 + 3 ...
            ([[0, "a"], [2, "b"]], 4),  # ... + 4: <think3> wins on weighted degree (13 > 9)
            ([[0, "c"], [1, "c"]], 1)]  # 1 of 14 matchings: below --min_share 0.1, not learned
    write_matching(tmp_path / "run", [early, late])
    result = select_token.main(select_token.parse_config(["--out_dir", str(tmp_path / "run"), "--min_share", "0.1"]))
    assert result["token"] == "<think3>"
    assert [(r["distinct"], r["weighted"]) for r in result["forks"]] == [(1, 4), (2, 9), (2, 13)]
    # <think1> covered 3 sources early on, but those configurations stopped accumulating mass
    assert select_token.learned_edges(select_token.learned_configurations(
        [{"edges": e, "count": n} for e, n in late], 0.1))[(0, "a")] == 4
    # with every last-epoch configuration kept, <think2> also reaches c: 3 distinct sources
    result = select_token.main(select_token.parse_config(["--out_dir", str(tmp_path / "run"), "--min_share", "0"]))
    assert result["token"] == "<think2>"
    assert json.load(open(tmp_path / "run" / "select_token.json"))["token"] == "<think2>"


def test_select_token_full_tie_goes_to_the_lowest_index_and_trace_indices_count():
    edges = select_token.learned_edges([{"edges": [[0, 0], [1, 1], [2, 1]], "count": 2},
                                        {"edges": [[0, 1], [1, 0]], "count": 2}])
    assert select_token.choose_token(edges, 3) == (0, [{"fork": 0, "distinct": 2, "weighted": 4},
                                                       {"fork": 1, "distinct": 2, "weighted": 4},
                                                       {"fork": 2, "distinct": 1, "weighted": 2}])


def test_select_token_draws_the_learned_graph_and_the_matching_dynamics(tmp_path):
    write_matching(tmp_path / "run", [[([[0, "a"], [1, "b"]], 3), ([[0, "b"], [1, "a"]], 1)], [([[0, "a"], [1, "b"]], 4)]])
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 2.0 / (s + 1), "gap": None if s == 0 else 0.1 * s}) + "\n" for s in range(4)))
    select_token.main(select_token.parse_config(["--out_dir", str(tmp_path / "run")]))
    for figure in ("learned_matchings.png", "matching_dynamics.png"):
        assert (tmp_path / "run" / figure).read_bytes()[:4] == b"\x89PNG"


def test_select_token_prints_each_tokens_share_and_names_traces_by_position(tmp_path, capsys):
    """The share is of every matching of the epoch, kept configurations or not; without sources the
    printout says that the 'styles' are trace positions. Epochs are numbered from 1."""
    first = [([[0, 0], [1, 1]], 10)]
    last = [([[0, 0], [1, 1]], 90), ([[0, 1], [1, 0]], 9), ([[0, 1], [2, 0]], 1)]  # the last: < --min_share 0.05
    write_matching(tmp_path / "run", [first, last])
    result = select_token.main(select_token.parse_config(["--out_dir", str(tmp_path / "run"), "--min_share", "0.05"]))
    out = capsys.readouterr().out
    assert "epoch 2 of 2" in out and result["epoch"] == 2
    assert [(r["top"], r["top_count"], r["share"]) for r in result["forks"]] == [(0, 90, 0.9), (1, 90, 0.9), (0, 1, 0.01)]
    assert "0: 90, 90.0%" in out and "0: 1, 1.0%" in out
    assert "columns: traces = " in out and "traces are named by their position" in out
    select_token.main(select_token.parse_config(["--out_dir", str(tmp_path / "run"), "--epoch", "1"]))
    assert "epoch 1 of 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--epoch 3: .* has epochs 1..2"):
        select_token.main(select_token.parse_config(["--out_dir", str(tmp_path / "run"), "--epoch", "3"]))


def test_select_token_rejects_a_malformed_log(tmp_path):
    (tmp_path / "matching.json").write_text('{"fork_tokens": ["<think1>"], "epochs": [{"configurations": '
                                            '[{"edges": [[3, "a"]], "count": 1}]}]}')
    with pytest.raises(SystemExit, match="matching.json: not a matching log"):
        select_token.main(select_token.parse_config(["--out_dir", str(tmp_path)]))
    (tmp_path / "matching.json").write_text('{"fork_tokens": ["<think1>"], "epochs": []}')
    with pytest.raises(SystemExit, match="matching.json: no epoch logged yet"):
        select_token.main(select_token.parse_config(["--out_dir", str(tmp_path)]))


def test_a_tie_for_the_top_source_is_shown_as_a_tie(tmp_path, capsys):
    """An SFT run matches every trace to its one token: each of the four sources is its top source in
    every question. The table names the four-way tie instead of one source at 100%."""
    sources = ["left", "right", "place", "direct"]
    (tmp_path / "matching.json").write_text(json.dumps({
        "matching": "sft", "num_forks": 1, "fork_tokens": ["<think1>"], "epochs": [
            {"epoch": 0, "configurations": [{"edges": [[0, s] for s in sources], "count": 50}]}]}))
    result = select_token.main(select_token.parse_config(["--out_dir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert result["forks"][0]["tied"] == sorted(sources) and result["forks"][0]["share"] == 1.0
    assert "4-way tie (direct, left, place, right): 50 each, 100.0%" in out, out
