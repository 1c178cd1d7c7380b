"""Decoding GFPO's rollouts under FSDP (gfpo.py, off the method's reading path): how many responses
at once and whether every layer stays gathered (the rollout memory plan, memory_report.py), the
weights gathered for decoding with every rank running the same forwards, and the responses decoded
and graded.
"""
import sys
from contextlib import contextmanager

import torch

from plumbing import batching, decoding, memory, memory_report
from plumbing.ranks import all_max, print0


def decoding_setup(cfg, run, model, world, device):
    """What decoding needs (respond's ctx): tag ids, stop ids, the forking tokens a response never
    samples, and how: on CUDA memory.gfpo_plan decides --gen_batch 0 and --keep_gathered auto
    (SystemExit when no response fits); on the CPU all rows at once, gathered."""
    rows, keep = cfg.gen_batch, cfg.keep_gathered == "yes"
    if device.type == "cuda" and (not rows or cfg.keep_gathered == "auto"):
        gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
        longest = max(map(len, run["prompts"] + run["held_out_prompts"]))
        plan = memory_report.rollout_plan(cfg, model.lm.config.to_dict(), world, gib,
                                          longest + cfg.max_new_tokens)
        print0("\n".join(memory_report.format_gfpo_plan(plan, world, gib)))
        if not plan["fits"]:
            sys.exit(f"error: not one response of {cfg.max_new_tokens} tokens fits beside the "
                     "weights: --cpu_offload true, a smaller --max_new_tokens or more GPUs")
        keep = plan["keep_gathered"] if cfg.keep_gathered == "auto" else keep
        rows = rows or plan["ways"]["gathered" if keep else "sharded"]["at_once"]
    elif cfg.keep_gathered == "auto":
        keep = True
    tokenizer, special = run["tokenizer"], run["forks"]["fork_style"] == "special"
    return {"fork_ids": run["fork_ids"], "stop_ids": decoding.stop_ids(tokenizer, model.lm),
            "tokenizer": tokenizer, "banned": [t[0] for t in run["fork_ids"]] if special else [],
            "pad_id": batching.pad_id_of(tokenizer), "device": device, "rows": rows,
            "keep_gathered": keep}


def respond(model, prompts, golds, starts, generator, cfg, ctx, reward):
    """One graded response per entry of starts [B][k] (forced tag token ids), all decoded together,
    ctx["rows"] at a time (0: all), with the weights gathered (decoding_weights); reward(text,
    finished, gold, cfg.truncated_reward) is gfpo.reward. Returns (rewards, tokens, truncated):
    [B, k] each."""
    with decoding_weights(model, ctx["keep_gathered"], ctx["device"], ctx["pad_id"]) as lm:
        out = decoding.generate_many(lm, prompts, starts, cfg.max_new_tokens, cfg.temperature,
                                     cfg.top_p, ctx["stop_ids"], generator, ctx["rows"],
                                     ctx["banned"], ctx["pad_id"])
    rewards = [[reward(ctx["tokenizer"].decode(ids), done, gold, cfg.truncated_reward)
                for ids, done in row] for row, gold in zip(out, golds)]
    return (torch.tensor(rewards), torch.tensor([[len(ids) for ids, _ in row] for row in out]),
            torch.tensor([[not done for _, done in row] for row in out]))


@contextmanager
def decoding_weights(model, keep_gathered, device, pad_id):
    """The causal LM inside the sharded `model` (gfpo.py's policy module), ready to decode: the
    root's parameters gathered (embeddings, final norm, output rows), and with keep_gathered every
    decoder layer's too, kept for the whole block instead of gathered again by every forward (the
    memory plan says when they fit). On leaving, ranks that ran fewer forwards run one-token
    forwards up to the busiest rank's count (each gathers its layers, a collective), then all is
    resharded."""
    lm, sharded = model.lm, hasattr(model, "unshard")
    layers = [m for m in lm.model.layers if hasattr(m, "unshard")] if sharded else []
    if sharded:
        model.unshard()
        for layer in layers if keep_gathered else []:
            layer.set_reshard_after_forward(False)
            layer.unshard()
    forwards = [0]
    counter = lm.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        yield lm
        for _ in range(all_max(forwards[0], device) - forwards[0]):
            lm(torch.tensor([[pad_id]], device=device))
    finally:
        counter.remove()
        for layer in layers if keep_gathered else []:
            layer.set_reshard_after_forward(True)
            layer.reshard()
        if sharded:
            model.reshard()
