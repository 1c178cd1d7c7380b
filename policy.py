"""The global forking policy: the model's own choice of forking tag (GFPO, arXiv 2510.05132 v3).

After SSFT the model's distribution over its N tags right after the generation prompt, renormalised
over the tags, is a policy over reasoning modes (gfpo.py trains it; infer.py --fork auto uses it):

    log p(g_i | x) = sum over the tag's tokens t of log p(t | x, the tag's tokens before t)
    pi(i | x)      = softmax_i( log p(g_i | x) / T )                   (T = 1 unless sampling says)

Terms shared by every tag cancel in the softmax, so only the rest is computed, in fp32 from the
final hidden state h (after the final norm) and the output rows W of the tags:
  the first token where the tags differ  log-softmax of h . W[c] over the distinct candidates c
                                         (the full vocabulary's normaliser is shared: it cancels)
  a tag's tokens after that               log-softmax over the whole vocabulary (text tags only)
Special tags (one reserved token each) have the first term alone: pi = softmax(h . W[tags]^T) from
one forward of the prompt, and no other output row gets a gradient through the logits (a
full-vocabulary cross-entropy in bf16 would leave ~4e-7 on every row, which Adam turns into steps of
about lr, and round the tag logits to bf16; tied embeddings still get the prompt's input gradient
under --trainable all). Text tags ("<|im_start|><thinkI>\\n") also read a row per tag for
the tokens after the digit. The mass sum_i p(g_i | x) before renormalisation is logged, not trained.
"""
import torch
from torch import nn

from plumbing.batching import collate


def common_prefix(fork_ids):
    """The number of leading tokens every tag shares (0 for special tags)."""
    p = 0
    while all(len(t) > p + 1 for t in fork_ids) and len({t[p] for t in fork_ids}) == 1:
        p += 1
    return p


class TagPolicy(nn.Module):
    """Wraps a causal LM: the tag logits of pi. forward(prompts) with prompts a list of B prompts'
    token ids -> {"tag_logits": [B, N] fp32, log p(g_i | x) up to a constant per question (with
    grad), "log_mass": [B] log sum_i p(g_i | x) (no grad)}. gfpo.py shards this module (FSDP2), so
    the embeddings, final norm and output rows are gathered by its own forward."""

    def __init__(self, lm, fork_ids, pad_id):
        super().__init__()
        self.lm, self.fork_ids, self.pad_id = lm, [list(t) for t in fork_ids], pad_id
        self.shared = common_prefix(self.fork_ids)
        self.candidates = sorted({t[self.shared] for t in self.fork_ids})  # where the tags differ
        self.choice = [self.candidates.index(t[self.shared]) for t in self.fork_ids]  # [N]
        self.one_row = all(len(t) == self.shared + 1 for t in self.fork_ids)  # none after it

    def forward(self, prompts):
        n, b = len(self.fork_ids), len(prompts)
        rows = [p + self.fork_ids[0][:self.shared] for p in prompts] if self.one_row \
            else [p + t for p in prompts for t in self.fork_ids]  # prompt + shared tokens, or + tag
        device = self.lm.get_input_embeddings().weight.device
        input_ids, _, mask = collate([(r, []) for r in rows], self.pad_id)  # [rows, L], no labels
        hidden = self.lm.model(input_ids=input_ids.to(device),
                               attention_mask=mask.to(device)).last_hidden_state  # [rows, L, H]
        weight = self.lm.get_output_embeddings().weight  # [V, H]
        first = [q * (1 if self.one_row else n) for q in range(b)]  # the row of (question q, tag 1)
        h = hidden[first, [len(p) + self.shared - 1 for p in prompts]].float()  # [B, H]
        cand = h @ weight[self.candidates].float().T  # [B, C]: the tags' own rows only
        logits = torch.log_softmax(cand, -1)[:, self.choice]  # [B, N]
        after = [(q * n + i, len(p) + k - 1, t[k]) for q, p in enumerate(prompts)
                 for i, t in enumerate(self.fork_ids) for k in range(self.shared + 1, len(t))]
        if after:  # text tags: their tokens after the choice, over the whole vocabulary
            index = torch.tensor([r for r, _, _ in after], device=device)
            logp = vocab_log_probs(hidden, weight, after)
            logits = logits + torch.zeros(b * n, device=device).index_add(0, index, logp).view(b, n)
        with torch.no_grad():  # log sum_i p(g_i | x): shared tokens, a candidate, logsumexp_i
            shared = [(first[q], len(p) + k - 1, self.fork_ids[0][k]) for q, p in enumerate(prompts)
                      for k in range(self.shared)]
            log_mass = torch.logsumexp(cand, -1) - torch.logsumexp(h @ weight.float().T, -1) \
                + torch.logsumexp(logits, -1)
            if shared:
                log_mass += vocab_log_probs(hidden, weight, shared).view(b, -1).sum(1)
        return {"tag_logits": logits, "log_mass": log_mass}


def vocab_log_probs(hidden, weight, places):
    """log p(t | h) over the whole vocabulary in fp32 at each (row, position, token t) of `places`:
    hidden [rows, L, H], weight [V, H], T places -> [T]."""
    rows, cols, targets = zip(*places)
    logp = torch.log_softmax(hidden[list(rows), list(cols)].float() @ weight.float().T, -1)
    return logp.gather(1, torch.tensor(targets, device=hidden.device)[:, None])[:, 0]


@torch.no_grad()
def tag_logits(policy_model, prompts, micro_batch=0):
    """TagPolicy's outputs for many prompts, `micro_batch` per forward (0: all at once), without
    grad, on the CPU: {"tag_logits": [B, N], "log_mass": [B]}."""
    step, parts = micro_batch or len(prompts), []
    for s in range(0, len(prompts), step):
        parts.append({k: v.cpu() for k, v in policy_model(prompts[s:s + step]).items()})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def log_policy(tag_logits, temperature=1.0):
    """log pi(i | x): [B, N], the tag logits renormalised over the N tags at `temperature`."""
    return torch.log_softmax(tag_logits.float() / temperature, dim=-1)


def kl_to_start(logpi, logpi_start):
    """KL(pi || pi_start) per question, [B], exact: a sum over the N tags of a small categorical."""
    return (logpi.exp() * (logpi - logpi_start)).sum(-1)


def entropy(logpi):
    """The entropy of pi per question, [B] (nats; log N when uniform)."""
    return -(logpi.exp() * logpi).sum(-1)


@torch.no_grad()
def choose_tags(logpi, count, greedy, generator):
    """[B, count] tag indices: every one the argmax of pi (greedy), or drawn independently from pi
    with a CPU generator (the draw is on the CPU whatever the model's device)."""
    return logpi.argmax(-1, keepdim=True).expand(-1, count) if greedy else \
        torch.multinomial(logpi.exp().float().cpu(), count, replacement=True, generator=generator)
