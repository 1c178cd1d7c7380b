"""Decoding with forking tags, shared by infer.py (evaluation) and gfpo.py (rollouts): each response's
tag forced as its first tokens, then nucleus sampling (the paper's T = 0.7, top_p 0.95) until a stop
token or the length limit. `generate`: the responses of one prompt, its KV cache prefilled once (the
reference). `generate_many`: the responses of many prompts in one batch (gfpo.py's rollouts).
"""
import copy
import inspect

import torch

from plumbing import files


def sample(logits, temperature, top_p, generator):
    """logits: [B, V] -> next token ids [B]. Temperature 0 is greedy; otherwise nucleus sampling from
    the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits.float() / temperature, -1).sort(-1, descending=True)
    probs[probs.cumsum(-1) - probs >= top_p] = 0  # the tokens before this one already reach top_p
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]


def cache_keyword(model):
    """The keyword of the KV cache in forward(): `cache` from transformers 5.24 on, `past_key_values`
    before (which silently ignores an unknown `cache=`, decoding without the prompt)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, prefix_ids, starts, max_new_tokens, temperature, top_p, stop_ids, generator, batch_size=0,
             banned=()):
    """Responses that share one prompt. prefix_ids: the shared prompt, prefilled once; starts: [S]
    each response's forced first tokens (its forking tag: one reserved token, or a text tag's
    tokens; tags may differ in length). Returns S pairs (ids, finished): the new tokens after the
    tag, cut before the first stop token, and whether one came within max_new_tokens. banned: ids a
    response never samples (gfpo.py: the forking tokens).

    Responses are decoded batch_size at a time (0: all S at once), each batch from a copy of the
    prefilled cache. Every row advances one token per forward, a row still in its tag taking the
    tag's next token instead of a sampled one, so all rows have the same length: no padding or
    attention mask is needed. A row that stops leaves the batch and its cache rows are dropped."""
    device = next(model.parameters()).device
    out = model(torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1)
    prefix = out["cache"] if "cache" in out else out["past_key_values"]
    result, chunk = [], batch_size or len(starts)
    for first in range(0, len(starts), chunk):
        forced = [list(s) for s in starts[first:first + chunk]]
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(forced))  # [1, heads, P, dim] -> [rows, heads, P, dim]
        result += decode_rows(model, cache, forced, max_new_tokens, temperature, top_p, stop_ids, generator,
                              banned)
    return result


@torch.no_grad()
def generate_many(model, prompts, starts, max_new_tokens, temperature, top_p, stop_ids, generator, max_rows=0,
                  banned=(), pad_id=0):
    """Responses of many prompts decoded together (gfpo.py's rollouts): prompts [Q] token id lists,
    starts [Q] lists of each prompt's responses' forced first tokens (as generate's). Returns [Q]
    lists of (ids, finished), as generate's.

    The Q x S responses are decoded max_rows at a time (0: all at once): a batch's distinct prompts
    are prefilled once, left-padded under an attention mask with position ids counted from each
    prompt's first token, and each prompt's cache rows are repeated for its responses. Under greedy
    decoding the responses equal generate's, prompt by prompt (a test)."""
    device = next(model.parameters()).device
    rows = [(q, list(s)) for q, ss in enumerate(starts) for s in ss]
    result, chunk = [], max_rows or len(rows)
    for first in range(0, len(rows), chunk):
        part = rows[first:first + chunk]
        qs = sorted({q for q, _ in part})
        width = max(len(prompts[q]) for q in qs)
        ids = torch.tensor([[pad_id] * (width - len(prompts[q])) + prompts[q] for q in qs], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[q])) + [1] * len(prompts[q]) for q in qs],
                            device=device)
        out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                    logits_to_keep=1)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        index = torch.tensor([qs.index(q) for q, _ in part], device=device)
        cache.batch_select_indices(index)  # each prompt's rows repeated for its responses
        result += decode_rows(model, cache, [s for _, s in part], max_new_tokens, temperature, top_p,
                              stop_ids, generator, banned, mask[index])
    out = [[] for _ in prompts]
    for (q, _), response in zip(rows, result):
        out[q].append(response)
    return out


def decode_rows(model, cache, forced, max_new_tokens, temperature, top_p, stop_ids, generator, banned=(),
                mask=None):
    """The decoding loop of generate and generate_many: rows [R] from a prefilled cache of R rows,
    row r first forced through forced[r]. mask: [R, P] the prompt's attention mask (None: no padding,
    none passed). Returns R pairs (ids, finished)."""
    device, kv = next(model.parameters()).device, cache_keyword(model)
    ids, finished = [[] for _ in forced], [False] * len(forced)
    live, tokens = list(range(len(forced))), torch.tensor([f[0] for f in forced], device=device)
    banned = torch.tensor(sorted(banned), dtype=torch.long, device=device)
    for step in range(1, max(map(len, forced)) + max_new_tokens):
        padding = {}
        if mask is not None:  # one more real position per row; its position id counts real tokens
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
            padding = {"attention_mask": mask, "position_ids": mask.sum(1, keepdim=True) - 1}
        logits = model(tokens[:, None], use_cache=True, **padding, **{kv: cache}).logits[:, -1]
        logits[:, banned] = float("-inf")
        sampled, keep, nxt = sample(logits, temperature, top_p, generator).tolist(), [], []
        for j, (row, t) in enumerate(zip(live, sampled)):
            if step < len(forced[row]):  # still inside the tag
                t = forced[row][step]
            elif t in stop_ids:
                finished[row] = True
                continue
            else:
                ids[row].append(t)
                if len(ids[row]) == max_new_tokens:
                    continue
            keep.append(j)
            nxt.append(t)
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask = mask[index] if mask is not None else None
            live = [live[j] for j in keep]
        tokens = torch.tensor(nxt, device=device)
    return list(zip(ids, finished))


def stop_ids(tokenizer, model):
    """The ids that end a response: the tokenizer's eos and the model's generation_config eos ids."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}


def load_model(model, device):
    """The causal LM of a folder or hub name, in eval mode on `device`: bf16 on a GPU as trained, fp32 on
    the CPU. SystemExit naming --model when it cannot load."""
    from transformers import AutoModelForCausalLM
    try:
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                                  attn_implementation="sdpa")
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: --model {model}: cannot load a causal LM "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return lm.to(device).eval()


def load_tokenizer(model):
    """files.load_tokenizer of --model, SystemExit with its one line when it cannot load."""
    try:
        return files.load_tokenizer(model)
    except files.DataError as e:
        raise SystemExit(f"error: {e}") from None
