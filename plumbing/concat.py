"""The concat layout (Appendix A.5), a fast path beside the batch layout's plain rows: one row per
question, the prompt once and then every branch (forking tag + trace) under a tree mask, so that
the prompt is computed once instead of once per branch. Used by the matching pass (`branch_costs`,
the N x M cost sequences of Eq. 4) and the training pass (`--layout concat`). The batch layout is the
reference: tests hold the costs, loss and gradients of this path equal to it.

On CUDA the mask is a FlexAttention BlockMask (never an L x L tensor), rows padded to a few widths
(`bucket_length`) so that FlexAttention compiles one graph per width; on the CPU, where FlexAttention
has no backward, it is a dense boolean mask for SDPA.
"""
import torch

from plumbing.batching import IGNORE, micro_batches, num_micro_batches, pad_item


def concat_room(lengths, room):
    """Tokens each trace may keep so that together they hold at most `room` (the concat row's bound):
    the shortest traces first, each taking at most an even share of what is left, so that a short
    trace is never cut and the long ones are cut to equal lengths. [int] in the order of `lengths`."""
    keep = [0] * len(lengths)
    for done, i in enumerate(sorted(range(len(lengths)), key=lambda i: lengths[i])):
        keep[i] = min(lengths[i], room // (len(lengths) - done))
        room -= keep[i]
    return keep


def make_branches(prompt_ids, branches):
    """One row of the sequence-concatenation layout (Appendix A.5): the prompt once, then each
    matched branch (tag_ids, trace_ids). Returns (input_ids, labels, position_ids, branch_ids), each
    a list of one length: branch 0 is the prompt, branch b >= 1 the b-th (forking token + trace).
    Every branch's positions continue from the end of the prompt, as if it were alone."""
    input_ids, labels = list(prompt_ids), [IGNORE] * len(prompt_ids)
    position_ids, branch_ids = list(range(len(prompt_ids))), [0] * len(prompt_ids)
    for b, (tag_ids, trace_ids) in enumerate(branches, start=1):
        ids = tag_ids + trace_ids
        input_ids += ids
        labels += [IGNORE] * len(tag_ids) + trace_ids
        position_ids += range(len(prompt_ids), len(prompt_ids) + len(ids))
        branch_ids += [b] * len(ids)
    return input_ids, labels, position_ids, branch_ids


def collate_branches(rows, pad_id, bucket=False):
    """Rows of make_branches -> input_ids, labels, position_ids, branch_ids: [B, L], right-padded
    (padding has branch id -1). A PAD row is ([pad_id], [IGNORE], [0], [-1]). bucket: L is rounded
    up by bucket_length, so that FlexAttention compiles one graph per bucket, not per length."""
    width = max(len(r[0]) for r in rows)
    width = bucket_length(width) if bucket else width
    out = [torch.full((len(rows), width), fill, dtype=torch.long) for fill in (pad_id, IGNORE, 0, -1)]
    for b, row in enumerate(rows):
        for tensor, values in zip(out, row):
            tensor[b, :len(values)] = torch.tensor(values)
    return out


def bucket_length(length, per_octave=4, smallest=128):
    """The row width `length` is padded to under FlexAttention: a multiple of 2^(e - 2) for lengths
    in [2^e, 2^(e+1)) (four widths per octave: at most 25% padding), and at least `smallest` (its
    block size). A run of rows up to L tokens so compiles at most num_buckets(L) graphs, where every
    distinct length would compile one (torch guards on the BlockMask's lengths) and, past Dynamo's
    recompile limit, fall back to eager FlexAttention, which materialises the B x H x L x L scores."""
    if length <= smallest:
        return smallest
    step = 2 ** max(0, length.bit_length() - 1 - (per_octave.bit_length() - 1))
    return -(-length // step) * step


def num_buckets(max_len, per_octave=4, smallest=128):
    """How many widths bucket_length gives to rows of 1..max_len tokens."""
    return len({bucket_length(n, per_octave, smallest) for n in range(1, max_len + 1)})


def tree_mask(branch_ids):
    """The attention mask of the concat layout, [B, 1, L, L] bool (True = may attend): query q sees
    key k <= q when k is in the prompt or in q's own branch, never another branch. Padding (-1)
    sees earlier padding only, so no row of the mask is empty. For SDPA: the eager attention path
    adds its mask to the scores, so a boolean mask there would be silently wrong."""
    q, k = branch_ids[:, :, None], branch_ids[:, None, :]
    length = branch_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch_ids.device).tril()
    return (causal & ((k == q) | ((k == 0) & (q >= 0))))[:, None]


def tree_attention(branch_ids):
    """The tree mask in the form the device's attention takes: a FlexAttention BlockMask on CUDA,
    a dense boolean mask for SDPA elsewhere (FlexAttention has no backward on the CPU)."""
    return tree_block_mask(branch_ids) if branch_ids.device.type == "cuda" else tree_mask(branch_ids)


def tree_block_mask(branch_ids):
    """The same mask as a FlexAttention BlockMask (CUDA): built from the rule block by block under
    torch.compile, never as an L x L tensor (on the CPU, where only the tests use it, eagerly)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q, k):
        bq, bk = branch_ids[b, q], branch_ids[b, k]
        return (k <= q) & ((bk == bq) | ((bk == 0) & (bq >= 0)))
    batch, length = branch_ids.shape  # compiled on CUDA: without it the rule is evaluated on the full grid
    return create_block_mask(rule, batch, None, length, length, device=branch_ids.device, _compile=branch_ids.is_cuda)


@torch.no_grad()
def branch_costs(nll_model, questions, fork_ids, match_tokens, batch_size, pad_id, device, num_batches=None):
    """Eq. 4 in the concat layout (Appendix A.5's rows, used for the cost matrix): one row per
    question, its prompt once and then its N x M branches (g_i, first K tokens of y_j) under the tree
    mask, so that the prompt is computed once instead of N*M times: P + N*M*(1+K) tokens instead of
    N*M*(P+1+K). A forward holds max(1, batch_size // (N*M)) questions (batch_size counts sequences,
    as in sequence_costs). Returns every question's N*M costs, fork-major, one after the other: the
    values sequence_costs gives for the same sequences (a test)."""
    rows = [make_branches(q["prompt_ids"], [(f, t[:match_tokens]) for f in fork_ids for t in q["trace_ids"]])
            for q in questions]
    per_forward = questions_per_forward(questions, len(fork_ids), batch_size)
    num_batches = num_batches or num_micro_batches(len(rows), per_forward)
    batches, order = micro_batches(rows, per_forward, num_batches, pad_item(pad_id, "concat"))
    was_training = nll_model.training
    nll_model.eval()
    costs = []
    for batch in batches:
        input_ids, labels, position_ids, branch_ids = (t.to(device) for t in collate_branches(batch, pad_id))
        nll, n = nll_model(input_ids, labels, tree_attention(branch_ids), position_ids, groups=branch_ids.clamp(min=0))
        costs += [(nll[r, 1:] / n[r, 1:].clamp(min=1))[:len(set(b[3]) - {0})].cpu() for r, b in enumerate(batch)]
    nll_model.train(was_training)
    by_question = [None] * len(rows)
    for i, cost in zip(order, costs):  # back from the length-sorted order of micro_batches
        by_question[i] = cost
    return torch.cat(by_question) if by_question else torch.zeros(0)


def num_cost_batches(questions, num_forks, batch_size):
    """Forwards branch_costs needs for `questions`: max(1, batch_size // (N*M)) questions per forward."""
    return num_micro_batches(len(questions), questions_per_forward(questions, num_forks, batch_size))


def questions_per_forward(questions, num_forks, batch_size):
    """Questions in one forward of branch_costs: as many as hold batch_size sequences, at least one."""
    return max(1, batch_size // (num_forks * max([len(q["trace_ids"]) for q in questions] or [1])))


def model_inputs(rows, pad_id, device):
    """A micro-batch of concat rows as the keyword arguments of match.SequenceNLL.forward; on CUDA
    padded to bucket_length, so that FlexAttention compiles one graph per bucket, not per length."""
    input_ids, labels, position_ids, branch_ids = (t.to(device) for t in collate_branches(
        rows, pad_id, bucket=device.type == "cuda"))
    return dict(input_ids=input_ids, labels=labels, attention_mask=tree_attention(branch_ids),
                position_ids=position_ids)


def allow_recompiles(max_len):
    """Raises Dynamo's recompile limit to the number of row widths a run of rows up to max_len tokens
    can have (one FlexAttention graph per bucket), so that none falls back to eager attention."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, num_buckets(max_len) + 2)
