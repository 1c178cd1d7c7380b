"""Tests of match.py: the cost matrix (Eq. 4), the matching (Eq. 3), the gap (Figure 10) and
SequenceNLL, against direct computations on a tiny model. CPU, seconds.
"""
import itertools
import math

import numpy as np
import pytest
import torch

import data
import match
import toy
from plumbing import batching, matchstats



def brute_force(cost):
    """Eq. 3 by definition: the minimum over all injective maps of the smaller side."""
    n, m = cost.shape
    if n >= m:
        return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
    return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))


@pytest.mark.parametrize("shape", [(4, 4), (6, 4), (5, 2), (3, 5), (1, 3), (4, 1)])
def test_hungarian_equals_bruteforce_over_injective_assignments(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.random(shape)
        forks, traces = match.hungarian(cost)
        assert len(forks) == len(traces) == min(shape)
        assert len(set(forks)) == len(forks) and len(set(traces)) == len(traces)  # injective
        if shape[0] >= shape[1]:
            assert sorted(traces) == list(range(shape[1]))  # every trace gets a token
        assert math.isclose(cost[forks, traces].sum(), brute_force(cost), rel_tol=1e-12)


def test_matching_gap_equals_mean_over_enumerated_other_assignments():
    rng = np.random.default_rng(0)
    for shape in [(4, 4), (6, 4), (3, 5)]:
        cost = rng.random(shape)
        forks, traces = match.hungarian(cost)
        n, m = shape
        maps = itertools.permutations(range(n), m) if n >= m else itertools.permutations(range(m), n)
        totals = [sum(cost[p[j], j] for j in range(m)) if n >= m else sum(cost[i, p[i]] for i in range(n))
                  for p in maps]
        best = cost[forks, traces].sum()
        others = sorted(totals)[1:]  # all but the optimum
        expected = (np.mean(others) - best) / min(n, m)
        assert math.isclose(matchstats.matching_gap(cost, forks, traces), expected, rel_tol=1e-9)


def test_random_matching_is_injective_and_seeded():
    for n, m in [(6, 4), (4, 4), (3, 7)]:
        f1, t1 = match.random_matching(n, m, np.random.default_rng(5))
        f2, t2 = match.random_matching(n, m, np.random.default_rng(5))
        assert (f1 == f2).all() and (t1 == t2).all()
        assert len(set(f1)) == len(f1) == min(n, m) and len(set(t1)) == len(t1)
    seen = {tuple(match.random_matching(4, 4, np.random.default_rng(s))[0]) for s in range(200)}
    assert len(seen) > 20  # many of the 24 permutations occur


def reference_costs(model, prompt_ids, tags, trace_ids, k):
    """Eq. 4 by a loop of plain forward passes, one (tag, trace) pair at a time."""
    cost = torch.zeros(len(tags), len(trace_ids))
    for i, f in enumerate(tags):
        for j, t in enumerate(trace_ids):
            ids = torch.tensor([prompt_ids + f + t[:k]])
            with torch.no_grad():
                logp = model(ids).logits[0].float().log_softmax(-1)
            start = len(prompt_ids) + len(f)  # first trace token
            nll = [-logp[p - 1, ids[0, p]] for p in range(start, ids.shape[1])]
            cost[i, j] = torch.stack(nll).mean()
    return cost


@pytest.mark.parametrize("style", ["special", "text"])
def test_cost_matrix_equals_per_pair_forward_loop_for_any_chunking(tiny, style):
    """Single-token tags and multi-token text tags (their tokens are prompt: no cost, no loss)."""
    tok, model, fork_ids = tiny
    tags = [[i] for i in fork_ids] if style == "special" else data.fork_ids(tok, 4, "text")
    q = {"prompt": "Add 12+23+14.", "traces": [toy.solve([12, 23, 14], s) for s in toy.STYLES]}
    enc = data.encode_question(tok, q, max_len=256)
    for k in (1000, 5):  # all trace tokens, and only the first K
        ref = reference_costs(model, enc["prompt_ids"], tags, enc["trace_ids"], k)
        for batch, ce_chunk in [(16, 1024), (3, 7), (1, 1)]:
            nll = match.SequenceNLL(model, ce_chunk=ce_chunk)
            got = match.cost_matrix(nll, enc["prompt_ids"], tags, enc["trace_ids"], k, batch, tok.pad_token_id)
            assert got.shape == (4, 4)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref.std() > 0.01  # rows differ: the test would notice swapped forks


@pytest.mark.parametrize("mode, layout", [("hungarian", "batch"), ("random", "batch"), ("hungarian", "concat")])
def test_match_questions_equals_cost_matrix_and_assignment_per_question(tiny, mode, layout):
    """The batched matching pass (all questions' sequences in one queue, any batch size, PAD
    forwards beyond what is needed; in the concat layout each prompt once, its N x M branches under
    the tree mask) gives, per question, the reference cost matrix's matching."""
    tok, model, fork_ids = tiny
    tags, nll = [[i] for i in fork_ids], match.SequenceNLL(model)
    questions = toy.make_questions(5, seed=2)
    questions[1]["traces"] = questions[1]["traces"][:1]  # M = 1
    questions[3]["traces"] = questions[3]["traces"] + questions[0]["traces"][:2]  # M = 6 > N = 4
    encoded = [data.encode_question(tok, q, 256) for q in questions]
    for batch, k, forwards in [(7, 1000, None), (64, 6, 9)]:
        got = match.match_questions(nll, encoded, tags, mode, k, batch, tok.pad_token_id, "cpu",
                                    [np.random.default_rng(q) for q in range(5)], forwards, layout)
        for q, (enc, m) in enumerate(zip(encoded, got)):
            cost = match.cost_matrix(nll, enc["prompt_ids"], tags, enc["trace_ids"], k, 3, tok.pad_token_id).numpy()
            optimal = match.hungarian(cost)
            assert [m.optimal_forks, m.optimal_traces] == [optimal[0].tolist(), optimal[1].tolist()]
            assert math.isclose(m.gap, matchstats.matching_gap(cost, *optimal), rel_tol=1e-4, abs_tol=1e-6)
            pairs = match.random_matching(4, len(enc["trace_ids"]), np.random.default_rng(q)) \
                if mode == "random" else optimal
            assert [m.forks, m.traces] == [pairs[0].tolist(), pairs[1].tolist()]
            assert len(m.forks) == min(4, len(enc["trace_ids"]))


def test_prompt_and_fork_carry_no_loss_and_cost_is_length_normalised(tiny):
    tok, model, fork_ids = tiny
    prompt_ids, trace = [5, 6, 7, 8], [20, 21, 22, 23, 24, 25]
    ids, labels = data.make_sequence(prompt_ids, [fork_ids[0]], trace)
    assert labels[:5] == [batching.IGNORE] * 5 and labels[5:] == trace and ids[4] == fork_ids[0]
    ids, labels = data.make_sequence(prompt_ids, [90, 91, 92], trace)  # a text tag: all its tokens are prompt
    assert labels[:7] == [batching.IGNORE] * 7 and labels[7:] == trace and ids[4:7] == [90, 91, 92]
    nll = match.SequenceNLL(model)
    for k in (2, 6, 100):
        torch.set_grad_enabled(False)
        seq = data.make_sequence(prompt_ids, [fork_ids[0]], trace, k)
        total, count = nll(*batching.collate([seq], tok.pad_token_id)[:2])
        assert int(count) == min(k, len(trace))  # only trace tokens are counted
        cost = match.cost_matrix(nll, prompt_ids, [fork_ids[:1]], [trace], k, 4, tok.pad_token_id)
        assert math.isclose(float(cost), float(total) / min(k, len(trace)), rel_tol=1e-6)
    torch.set_grad_enabled(True)


def test_sequence_nll_equals_hugging_face_loss(tiny):
    """The chunked cross-entropy (never [tokens, vocab] logits for the whole batch) is the plain loss."""
    tok, model, fork_ids = tiny
    seqs = [data.make_sequence([3, 4, 5], [fork_ids[i % 4]], list(range(30, 30 + 5 + 3 * i))) for i in range(4)]
    input_ids, labels, mask = batching.collate(seqs, tok.pad_token_id)
    total, count = match.SequenceNLL(model, ce_chunk=5)(input_ids, labels, mask)
    reference = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(total.sum() / count.sum(), reference, rtol=1e-5, atol=1e-6)
