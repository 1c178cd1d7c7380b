"""Batching (the paper's Algorithm 2, Appendix A.1): lists of token ids to right-padded tensors, a
rank's queue cut into micro-batches, PAD items so that every rank runs the same number of forwards
(FSDP's collectives need it), and questions shared over the ranks by tokens.
"""
import math

import torch

IGNORE = -100  # label of tokens that carry no loss


def pad_id_of(tokenizer):
    """The token that pads rows: the tokenizer's pad token, or its eos when it has none."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def collate(sequences, pad_id):
    """List of (input_ids, labels) -> input_ids, labels, attention_mask: [B, L], right-padded.
    A PAD sequence is ([pad_id], [IGNORE]): one token, no loss."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, (ids, lab) in enumerate(sequences):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
        attention_mask[b, :len(ids)] = 1
    return input_ids, labels, attention_mask


def pad_item(pad_id, layout="batch"):
    """A PAD sequence (batch layout) or PAD row (concat layout): one token, no loss."""
    return ([pad_id], [IGNORE]) if layout == "batch" else ([pad_id], [IGNORE], [0], [-1])


def micro_batches(items, micro_batch, num_batches, pad):
    """Cuts a rank's queue (questions stitched together) into `num_batches` micro-batches: longest
    items first, so that items of similar length share a batch and little width is padded, at most
    `micro_batch` per batch, then batches of one PAD item (one token, no loss) up to `num_batches`.
    Every rank runs the same number of forwards, which FSDP's collectives require (the shapes may
    differ). Returns (batches, order): batches[k][i] is items[order[k * micro_batch + i]]."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    batches = [[items[i] for i in order[s:s + micro_batch]] for s in range(0, len(items), micro_batch)]
    assert len(batches) <= num_batches
    return batches + [[pad]] * (num_batches - len(batches)), order


def num_micro_batches(num_sequences, micro_batch):
    return max(1, math.ceil(num_sequences / micro_batch))


def balance(loads, world_size):
    """Algorithm 2's queue, global view, by tokens: items spread over ranks by load, the largest
    first, each onto the rank with the least load so far (longest-processing-time first), so that a
    step waits less for its slowest rank.
    Returns, per rank, the indices of its items in ascending order. Deterministic, so every rank
    computes the same split without communication."""
    ranks, total = [[] for _ in range(world_size)], [0] * world_size
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        r = min(range(world_size), key=lambda r: (total[r], r))
        ranks[r].append(i)
        total[r] += loads[i]
    return [sorted(r) for r in ranks]
