"""The global forking policy: the model's own choice of forking tag (GFPO, arXiv 2510.05132 v3).

After SSFT the model has a distribution over the N tags at the position right after the generation
prompt. Renormalised over the tags, it is a policy over reasoning modes:

    log p(g_i | x) = sum over the tag's tokens t of log p(t | x, the tag's tokens before t)
    pi(i | x)      = softmax_i( log p(g_i | x) / T )                   (T = 1 unless sampling says)

One token per tag in the special style, the sum over "<|im_start|><thinkI>\\n" in the text style.
gfpo.py trains pi by reinforcement learning; infer.py --fork auto answers with its choice.

The forward is one row per (question, tag): prompt + tag, labels on the tag's tokens only, through
match.SequenceNLL, so the vocabulary projection runs on the N * (tag length) labelled positions and
never on the prompt. The prompt is recomputed N times; the concat layout's tree mask would compute
it once, but this pass is a sliver of a GFPO step (the responses are thousands of tokens, the
prompts hundreds) and N plain rows read, and run on every attention backend, as they are.
"""
import torch

import data
from plumbing import batching


def policy_rows(prompt_ids, fork_ids):
    """The N rows (input_ids, labels) of one question: prompt + tag g_i, labels on the tag's tokens."""
    return [data.make_sequence(prompt_ids, [], tag) for tag in fork_ids]


def tag_log_probs(nll_model, prompts, fork_ids, pad_id, device):
    """log p(g_i | x): [B, N] fp32, for B prompts (token ids, data.encode_prompt) and the N tags'
    token ids (data.fork_ids). nll_model: match.SequenceNLL around the causal LM (or an FSDP model of
    it). One forward of B * N rows; gradients flow when enabled (gfpo.py's update)."""
    rows = [row for p in prompts for row in policy_rows(p, fork_ids)]
    input_ids, labels, attention_mask = (t.to(device) for t in batching.collate(rows, pad_id))
    nll_sum, _ = nll_model(input_ids, labels, attention_mask)
    return -nll_sum.view(len(prompts), len(fork_ids))


def log_policy(tag_logp, temperature=1.0):
    """log pi(i | x): [B, N], the tags' log-probabilities renormalised over the N tags at `temperature`."""
    return torch.log_softmax(tag_logp / temperature, dim=-1)


def kl_to_start(logpi, logpi_start):
    """KL(pi || pi_start) per question, [B], exact: a sum over the N tags of a small categorical."""
    return (logpi.exp() * (logpi - logpi_start)).sum(-1)


def entropy(logpi):
    """The entropy of pi per question, [B] (nats; log N when uniform)."""
    return -(logpi.exp() * logpi).sum(-1)


@torch.no_grad()
def choose_tags(logpi, count, greedy, generator):
    """[B, count] tag indices: every one the argmax of pi (greedy), or drawn independently from pi."""
    if greedy:
        return logpi.argmax(-1, keepdim=True).expand(-1, count)
    return torch.multinomial(logpi.exp().float().cpu(), count, replacement=True, generator=generator)
