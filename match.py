"""Bipartite matching between global forking tokens and reasoning traces (Section 2.2, Eq. 3-5).

For a question x with traces y_1..y_M and forking tokens g_1..g_N, the cost of the edge (i, j) is
the length-normalised NLL of the first K tokens of y_j given (x, g_i), under stop-gradient (Eq. 4):

    C[i, j] = -1/K_j * sum_{t <= K_j} log p(y_j,t | x, g_i, y_j,<t),   K_j = min(K, |y_j|)

(|y_j| counts the eos closing every trace, data.encode_question: a short trace's cost includes it.)

The optimal matching sigma* minimises sum_j C[sigma(j), j] over injective maps (Eq. 3, Hungarian
algorithm), and the training loss is the NTP loss of every trace under its matched token (Eq. 5).

    --matching hungarian   SSFT: the optimal matching of Eq. 3
    --matching random      ablation: a uniformly random injective matching each step
    --matching sft         SFT-mixed baseline: every trace paired with the first token, <think1>

`match_questions` is the matching pass as train.py runs it (as DETR's HungarianMatcher): every cost
sequence of a batch of questions in one queue of no-grad forwards, then one assignment per question.
`cost_matrix` is Eq. 4 for one question, the reference the tests hold the batched pass to.

    python -m pytest -q tests/test_match.py
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.checkpoint import checkpoint

from data import make_sequence
from plumbing import concat
from plumbing.batching import IGNORE, collate, micro_batches, num_micro_batches, pad_item
from plumbing.matchstats import matching_gap


class SequenceNLL(nn.Module):
    """Wraps a Hugging Face causal LM to return, per sequence, the summed NLL of its labelled tokens
    and their count: the quantity behind both the matching cost (Eq. 4) and the loss (Eq. 5). The
    vocabulary projection runs on labelled positions only, `ce_chunk` tokens at a time (checkpointed
    under grad): the [tokens, vocab] fp32 logits of a 152k vocabulary never exist for a batch."""

    def __init__(self, lm, ce_chunk=1024):
        super().__init__()
        self.lm, self.ce_chunk = lm, ce_chunk

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None, groups=None):
        """input_ids, labels: [B, L] -> (nll_sum [B] fp32, num_tokens [B]). With groups [B, L] (ids
        0..G-1 per token, e.g. the branches of the concat layout), sums per row and group: [B,
        G]."""
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state  # [B, L, H]
        targets = labels[:, 1:]
        rows, cols = (targets != IGNORE).nonzero(as_tuple=True)  # position t predicts token t+1
        h, y = hidden[rows, cols], targets[rows, cols]  # [T, H], [T]
        weight = self.lm.get_output_embeddings().weight
        token_nll = []
        for s in range(0, len(y), self.ce_chunk):
            args = (h[s:s + self.ce_chunk], weight, y[s:s + self.ce_chunk])
            token_nll.append(checkpoint(_chunk_nll, *args, use_reentrant=False)
                             if torch.is_grad_enabled() else _chunk_nll(*args))
        token_nll = torch.cat(token_nll) if token_nll else hidden.new_zeros(0, dtype=torch.float32)
        if groups is not None:  # the sums of each (row, group): index row * G + group
            size = int(groups.max()) + 1
            index = rows * size + groups[:, 1:][rows, cols]
            cells = len(input_ids) * size
            nll = torch.zeros(cells, device=hidden.device).index_add(0, index, token_nll)
            return nll.view(-1, size), torch.bincount(index, minlength=cells).view(-1, size)
        nll_sum = torch.zeros(len(input_ids), device=hidden.device).index_add(0, rows, token_nll)
        if len(y) == 0:  # an all-PAD micro-batch: still give every parameter a (zero) gradient, so
            nll_sum = nll_sum + 0.0 * (hidden.sum() + weight.sum())  # every rank reduces the same
        return nll_sum, torch.bincount(rows, minlength=len(input_ids))


def _chunk_nll(h, weight, y):
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="none")


# ----------------------------------------------------------------------------- Eq. 4: costs

def cost_sequences(prompt_ids, fork_ids, trace_ids, match_tokens):
    """The N x M sequences (prompt, g_i, first K tokens of y_j), fork-major: index i * M + j.
    fork_ids[i]: the token ids of tag g_i (data.fork_ids)."""
    return [make_sequence(prompt_ids, f, t[:match_tokens]) for f in fork_ids for t in trace_ids]


@torch.no_grad()
def sequence_costs(nll_model, sequences, batch_size, pad_id, device, num_batches=None):
    """Length-normalised NLL of each sequence: [len(sequences)] on the CPU. One batched forward per
    `batch_size` sequences (bounds memory); `num_batches` >= what is needed pads the list with PAD
    sequences so that every rank runs the same number of forwards under FSDP."""
    num_batches = num_batches or num_micro_batches(len(sequences), batch_size)
    batches, order = micro_batches(sequences, batch_size, num_batches, pad_item(pad_id))
    was_training = nll_model.training
    nll_model.eval()
    costs = []
    for batch in batches:
        input_ids, labels, attention_mask = (t.to(device) for t in collate(batch, pad_id))
        nll_sum, n = nll_model(input_ids, labels, attention_mask)
        costs.append((nll_sum / n.clamp(min=1)).cpu())
    nll_model.train(was_training)
    costs = torch.cat(costs)[:len(sequences)]
    return torch.empty_like(costs).index_copy_(0, torch.tensor(order, dtype=torch.long), costs)


def cost_matrix(nll_model, prompt_ids, fork_ids, trace_ids, match_tokens, batch_size, pad_id,
                device="cpu"):
    """C: [num_forks, num_traces], Eq. 4 for one question (no grad, model in eval mode)."""
    seqs = cost_sequences(prompt_ids, fork_ids, trace_ids, match_tokens)
    costs = sequence_costs(nll_model, seqs, batch_size, pad_id, device)
    return costs.view(len(fork_ids), len(trace_ids))


def num_cost_batches(questions, num_forks, batch_size, layout="batch"):
    """Forwards the matching pass of `questions` needs: its N x M sequences in batches of batch_size
    (batch layout), or its questions in rows (concat layout: concat.num_cost_batches)."""
    if layout == "concat":
        return concat.num_cost_batches(questions, num_forks, batch_size)
    return num_micro_batches(num_forks * sum(len(q["trace_ids"]) for q in questions), batch_size)


# ----------------------------------------------------------------------------- Eq. 3: matching

def hungarian(cost):
    """Minimum-cost injective matching (Eq. 3). cost: [num_forks, num_traces].
    Returns (forks, traces), int arrays of length min(num_forks, num_traces), sorted by trace:
    every trace gets a distinct fork when num_forks >= num_traces; otherwise only num_forks traces
    are matched (and train this step)."""
    forks, traces = linear_sum_assignment(np.asarray(cost, dtype=np.float64))
    order = np.argsort(traces)
    return forks[order], traces[order]


def random_matching(num_forks, num_traces, rng):
    """A uniformly random injective matching (the paper's random-matching ablation)."""
    k = min(num_forks, num_traces)
    forks, traces = rng.permutation(num_forks)[:k], rng.permutation(num_traces)[:k]
    order = np.argsort(traces)
    return forks[order], traces[order]


def assign(mode, cost, num_forks, num_traces, rng):
    """One entry point for the three modes, so that they differ only in this choice."""
    if mode == "hungarian":
        return hungarian(cost)
    if mode == "random":
        return random_matching(num_forks, num_traces, rng)
    if mode == "sft":  # one <think> token for all traces, each trace its own example
        return np.zeros(num_traces, dtype=int), np.arange(num_traces)
    raise ValueError(f"unknown matching {mode!r}")


class NonFiniteCost(FloatingPointError):
    """Cost matrices holding NaN or inf (diverged weights); `questions` are their positions."""

    def __init__(self, questions):
        super().__init__(f"non-finite matching costs for questions {questions}")
        self.questions = questions


@dataclass
class Matching:
    """One question's matching: trace traces[k] trains under fork forks[k] (Eq. 5). The statistics
    count the optimal matching in every mode (Figure 7a counts it under random matching too); under
    sft all M traces train under fork 0 and no cost pass runs."""
    forks: list  # fork indices, one per trained trace, sorted by trace
    traces: list  # trace indices: min(num_forks, num_traces) of them when matched, all M under sft
    optimal_forks: list
    optimal_traces: list
    gap: float = None  # matching_gap of the optimum (None under sft)


@torch.no_grad()
def match_questions(nll_model, questions, fork_ids, mode, match_tokens, batch_size, pad_id, device,
                    rngs, num_batches=None, layout="batch"):
    """Eq. 3-4 for a batch of encoded questions ([{"prompt_ids", "trace_ids"}]): every question's N
    x M cost sequences in one queue of no-grad forwards of `batch_size` sequences, then one
    assignment per question (rngs[k]: question k's random matching). num_batches: the forwards to
    run, PAD batches filling the rest (every rank runs as many under FSDP); layout "concat" computes
    each prompt once (concat.branch_costs). Returns one Matching per question, in order; raises
    NonFiniteCost (after all the forwards) if a cost is NaN or inf."""
    costs = None
    if mode != "sft" and layout == "concat":
        costs = concat.branch_costs(nll_model, questions, fork_ids, match_tokens, batch_size,
                                    pad_id, device, num_batches)
    elif mode != "sft":  # the SFT baseline needs no cost matrix
        seqs = [s for q in questions
                for s in cost_sequences(q["prompt_ids"], fork_ids, q["trace_ids"], match_tokens)]
        costs = sequence_costs(nll_model, seqs, batch_size, pad_id, device, num_batches)
    n, sizes = len(fork_ids), [len(q["trace_ids"]) for q in questions]
    cost_matrices = [None] * len(questions) if costs is None else \
        list(costs.split([n * m for m in sizes]))
    bad = [k for k, c in enumerate(cost_matrices) if c is not None and not torch.isfinite(c).all()]
    if bad:  # diverged weights: stop here, not inside linear_sum_assignment
        raise NonFiniteCost(bad)
    matched = []
    for cost, m, rng in zip(cost_matrices, sizes, rngs):
        cost = cost.view(n, m).numpy() if cost is not None else None
        forks, traces = assign(mode, cost, n, m, rng)
        optimal = hungarian(cost) if mode == "random" else (forks, traces)
        gap = matching_gap(cost, *optimal) if cost is not None else None
        matched.append(Matching([int(f) for f in forks], [int(j) for j in traces],
                                [int(f) for f in optimal[0]], [int(j) for j in optimal[1]], gap))
    return matched
