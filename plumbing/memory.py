"""A memory plan before anything loads: per-GPU and host memory of a train.py run, and of infer.py's
weights and KV cache, from a model's config.json alone (no weights, tokenizer or data).

    python train.py --model Qwen/Qwen2.5-32B-Instruct --plan 8x80                    # exit 0 fits, 3 not
    python train.py --model Qwen/Qwen2.5-32B-Instruct --plan 8x80 --cpu_offload true

The arithmetic (FSDP2 over G GPUs, bf16 compute on fp32 weights, GiB = 2^30 bytes; P parameters,
H hidden, I MLP width, D = kv heads x head dim, V vocabulary, n layers, T tokens per micro-batch):
  sharded state       fp32 weights 4P/G, gradients 4P/G, AdamW moments 8P/G (to host with --cpu_offload)
  optimiser step      foreach AdamW's temporary, 4P/G; 0 with fused AdamW (train.py on CUDA)
  unsharded root      the root FSDP unit (embeddings, lm_head) stays gathered in bf16: 2VH (4VH untied)
  gathered layers     current + prefetched layer in bf16, its bf16 gradients and their fp32 reduce copy:
                      (2 + 2 + 2 + 4) bytes x one layer's parameters
  layer checkpoints   with activation checkpointing, each layer's bf16 input: 2nTH
  one layer's acts    what one decoder layer saves for backward (all n of them without checkpointing):
                      T x [2 (7H + 2D + 4I) + 4 x 2H] bytes (bf16 projections, q/k/v, the four
                      I-wide MLP tensors; the two RMSNorms upcast their input to fp32)
  backward transients gradients in flight through one layer: T x 2 x 2 (I + H) bytes
  cross-entropy       one 1024-token chunk of logits (bf16, fp32, its gradient, softmax): 1024 V x 14 bytes
  final hidden        final norm (fp32), the last hidden state, its gathered rows and their gradient: 10TH
  context             the CUDA context, NCCL buffers, allocator slack: 2 GiB
The matching pass (no grad) holds the same state plus one layer's forward transients and a logits chunk
for its match_batch rows, always less than the training pass at micro-batch 1 and the same row length.
Sources: PyTorch's FSDP2 design (fully_shard, MixedPrecisionPolicy, CPUOffloadPolicy), the Qwen2 modelling
code of transformers 5.24; test_scale.py checks the parameter count and the saved-activation bytes
against real modules on the CPU.
"""
import json
import math
import os
import sys

GIB = 2 ** 30
CE_CHUNK = 1024  # match.SequenceNLL's ce_chunk
CONTEXT_GIB = 2.0  # CUDA context, NCCL, allocator slack per GPU
HOST_BASE_GIB = 4.0  # a rank's process on the host: torch, CUDA and NCCL libraries, pinned buffers
PROMPT_TOKENS = 1024  # prompt length assumed for the matching pass's rows (their K trace tokens follow)


def read_shape(config):
    """The shape of a decoder-only transformer from its config.json as a dict: hidden, intermediate,
    layers, heads, kv_heads, head_dim, vocab, tied. config: a dict, a local folder holding config.json,
    or a Hugging Face id (only config.json is fetched). Raises ValueError naming what is missing."""
    where = config
    if isinstance(config, str):
        path = os.path.join(config, "config.json")
        if not os.path.isdir(config):
            from huggingface_hub import hf_hub_download
            try:
                path = hf_hub_download(config, "config.json")
            except Exception as e:  # offline, unknown id: one message naming the model
                raise ValueError(f"--model {config}: no config.json ({type(e).__name__})") from None
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read a model config ({e})") from None
        where = path
    config = config.get("text_config", config)
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{where}: no {', '.join(missing)}: not a decoder-only transformer's config")
    heads = config["num_attention_heads"]
    return dict(hidden=config["hidden_size"], intermediate=config["intermediate_size"],
                layers=config["num_hidden_layers"], heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                vocab=config["vocab_size"], tied=bool(config.get("tie_word_embeddings", False)))


def layer_params(s):
    """Parameters of one Qwen2 decoder layer: q/k/v (with biases), o, the gated MLP, two RMSNorms."""
    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * s["intermediate"] + 2 * h


def num_params(s):
    """All parameters: embeddings, lm_head unless tied, the layers, the final norm."""
    return s["vocab"] * s["hidden"] * (1 if s["tied"] else 2) + s["layers"] * layer_params(s) + s["hidden"]


def layer_activation_bytes(s, tokens, act_bytes=2):
    """Bytes one decoder layer saves for backward over `tokens` tokens (act_bytes: 2 for bf16 compute)."""
    h, kv, i = s["hidden"], s["kv_heads"] * s["head_dim"], s["intermediate"]
    return tokens * (act_bytes * (7 * h + 2 * kv + 4 * i) + 4 * 2 * h)


def train_plan(s, gpus, layout="batch", max_len=32768, micro_batch=1, match_batch=8, match_tokens=1000,
               num_forks=6, traces=4, activation_checkpointing=True, cpu_offload=False, fused_adamw=True):
    """{"lines": [(what, GiB per GPU)], "peak_gib_per_gpu", "host_gib_per_rank", "rank0_load_gib",
    "train_tokens", "match_tokens"} of one train.py rank. Worst case: every micro-batch row is max_len
    tokens long (concat rows are bounded by max_len as a whole, data.encode_question). traces: M, the
    traces of a question (the concat matching row holds N x M branches)."""
    P, h, v, n = num_params(s), s["hidden"], s["vocab"], s["layers"]
    T = micro_batch * max_len  # batch: micro_batch sequences; concat: micro_batch questions, each one row
    if layout == "batch":
        match_t = match_batch * min(max_len, PROMPT_TOKENS + 1 + match_tokens)
    else:
        per_row = min(max_len, PROMPT_TOKENS + num_forks * traces * (1 + match_tokens))
        match_t = max(1, match_batch // (num_forks * traces)) * per_row
    state = [("sharded fp32 weights", 4 * P / gpus), ("sharded fp32 gradients", 4 * P / gpus),
             ("sharded AdamW moments", 8 * P / gpus),
             ("AdamW step temporary (0: fused AdamW)", 0 if fused_adamw else 4 * P / gpus)]
    on_gpu = [(w, 0.0 if cpu_offload else b / GIB) for w, b in state]
    root = 2 * v * h * (1 if s["tied"] else 2)
    act = layer_activation_bytes(s, T)
    lines = on_gpu + [
        ("unsharded root (embeddings, lm_head)", root / GIB),
        ("gathered layers, prefetch, reduce buffers", 10 * layer_params(s) / GIB),
        (f"layer-input checkpoints ({n} x {T} tokens)" if activation_checkpointing else "-",
         2 * n * T * h / GIB if activation_checkpointing else 0.0),
        ("one recomputed layer's activations" if activation_checkpointing else f"activations of all {n} layers",
         act * (1 if activation_checkpointing else n) / GIB),
        ("backward transients", T * 4 * (s["intermediate"] + h) / GIB),
        ("cross-entropy chunk", CE_CHUNK * v * 14 / GIB),
        ("final norm and gathered hidden", 10 * T * h / GIB),
        ("CUDA context, NCCL, slack", CONTEXT_GIB)]
    lines = [(w, g) for w, g in lines if w != "-"]
    train_peak = sum(g for _, g in lines)
    match_peak = sum(g for w, g in lines[:6]) + (layer_activation_bytes(s, match_t) + CE_CHUNK * v * 14
                                                 + 10 * match_t * h) / GIB + CONTEXT_GIB
    host_state = sum(b for _, b in state) / GIB if cpu_offload else 0.0
    rank0_load = 2 * P / GIB + 4 * P / gpus / GIB  # the bf16 checkpoint read whole on rank 0, its fp32 shard
    return {"lines": lines, "peak_gib_per_gpu": max(train_peak, match_peak),
            "host_gib_per_rank": HOST_BASE_GIB + max(host_state, rank0_load),
            "host_gib_other_ranks": HOST_BASE_GIB + host_state,
            "train_tokens": T, "match_tokens": match_t, "match_peak_gib": match_peak, "params": P}


def format_plan(plan, gpus, gib):
    """The table train.py --plan prints, and its verdict line."""
    out = [f"memory plan per GPU ({gpus} GPUs, {plan['params'] / 1e9:.2f}B parameters, "
           f"{plan['train_tokens']} tokens per training micro-batch, {plan['match_tokens']} per matching forward):"]
    out += [f"  {what:<46s} {g:7.1f} GiB" for what, g in plan["lines"]]
    fits = plan["peak_gib_per_gpu"] <= gib
    out.append(f"  {'peak (the matching pass: ' + format(plan['match_peak_gib'], '.1f') + ')':<46s} "
               f"{plan['peak_gib_per_gpu']:7.1f} GiB of {gib:g}: {'fits' if fits else 'does NOT fit'}")
    out.append(f"  host memory per rank {plan['host_gib_per_rank']:.1f} GiB (rank 0 while loading; the others "
               f"{plan['host_gib_other_ranks']:.1f}), {plan['host_gib_per_rank'] + (gpus - 1) * plan['host_gib_other_ranks']:.0f}"
               f" GiB for {gpus} ranks")
    return out, fits


def parse_gpus(text):
    """'8x80' -> (8, 80.0): GPUs and GiB of memory each. Raises ValueError naming --plan."""
    try:
        gpus, gib = text.lower().split("x")
        gpus, gib = int(gpus), float(gib)
        assert gpus >= 1 and gib > 0
    except (ValueError, AssertionError):
        raise ValueError(f"--plan must be GPUSxGiB, e.g. 8x80 (got {text!r})") from None
    return gpus, gib


def infer_plan(s, streams, context, weight_bytes=2):
    """(weights GiB, KV cache GiB) of infer.py: every rank holds the whole model, and the KV cache of
    `streams` responses of `context` tokens (prompt + new tokens): 2 (K and V) x layers x D per token."""
    kv = streams * context * s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * weight_bytes
    return num_params(s) * weight_bytes / GIB, kv / GIB


PLAN_HINT = ("to fit: --cpu_offload true (sharded state to host memory), a smaller --max_len or --micro_batch, "
             "--activation_checkpointing true, or more GPUs (docs/scaling.md)")


def plan_problem(text):
    """The --plan problem for flags.check, or None ('' means no plan asked)."""
    try:
        text and parse_gpus(text)
    except ValueError as e:
        return str(e)
    return None


def plan_exit(make_plan, gpus, gib, settings):
    """--plan GPUSxGiB: prints the memory table of make_plan() and one JSON line (with `settings`, the
    flags that shape it), then exits 0 if it fits, 3 if not. make_plan reads only config.json."""
    try:
        plan = make_plan()
    except ValueError as e:
        sys.exit(f"error: {e}")
    lines, fits = format_plan(plan, gpus, gib)
    print("\n".join(lines + ([] if fits else [f"  {PLAN_HINT}"])))
    print(json.dumps({"peak_gib_per_gpu": round(plan["peak_gib_per_gpu"], 1),
                      "host_gib_per_rank": round(plan["host_gib_per_rank"], 1), "fits": fits, "gpus": gpus,
                      "gib_per_gpu": gib, **settings}))
    sys.exit(0 if fits else 3)


def refuse_unless_fits(plan, world, device):
    """On CUDA, before the weights load: prints the plan for the GPUs we are on and exits naming what to
    change when it does not fit."""
    import torch
    gib = torch.cuda.get_device_properties(device).total_memory / GIB
    lines, fits = format_plan(plan, world, gib)
    if int(os.environ.get("RANK", 0)) == 0:
        print("\n".join(lines), flush=True)
    if not fits:
        sys.exit(f"error: these flags do not fit {world} x {gib:.0f} GiB; {PLAN_HINT}")


def refuse_unless_infer_fits(model, streams, max_new_tokens, device):
    """infer.py, before loading: SystemExit when a whole model per rank (read on its CPU first) and the
    KV cache of `streams` responses of a PROMPT_TOKENS prompt + max_new_tokens cannot fit a rank
    (infer_plan: 256 GiB of cache for 32B at 32 x 32k), naming what to lower or vLLM. A model without
    a plain config.json is left to from_pretrained to judge."""
    import torch
    try:
        shape = read_shape(model)
    except ValueError:
        return
    context = PROMPT_TOKENS + max_new_tokens
    weights, kv = infer_plan(shape, streams, context, 2 if device.type == "cuda" else 4)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    have = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else host
    if weights + kv > have or weights > host:
        raise SystemExit(f"error: --model {model}: {weights:.0f} GiB of weights + {kv:.0f} GiB of KV cache "
                         f"({streams} streams x {context} tokens) do not fit {have:.0f} GiB on {device.type} per rank "
                         f"(host {host:.0f} GiB): infer.py keeps a whole model per rank; lower --batch_size or "
                         "--max_new_tokens, or serve it with vLLM (docs/vllm.md)")


# ----------------------------------------------------------------------------- GFPO's rollouts (gfpo.py)

LINK_GBPS = 400  # all-gather bandwidth per GPU, GB/s (NVLink 4: 900 GB/s both ways; NCCL reaches about this)


def hbm_tbps(gib):
    """HBM bandwidth, TB/s, of the GPU by its memory: H200 (141 GB) 4.8, H100 (80 GB) 3.35."""
    return 4.8 if gib > 100 else 3.35


def gfpo_plan(s, gpus, gib, rows, context, cpu_offload=False):
    """gfpo.py's rollout phase per GPU: its `rows` responses (B / gpus x G) of up to `context` tokens
    (prompt + max_new_tokens) decoded in batches that fit beside the weights, either with each layer
    gathered by every forward (FSDP's default) or with every layer kept gathered for the whole phase.
    Per way: the weights held, the responses at once, the batches, a decode step's seconds (sharded:
    the all-gather of the bf16 layers over LINK_GBPS; gathered: reading the weights and the cache
    from HBM) and the phase's hours if every response runs to `context`. The state held meanwhile:
    fp32 weights and AdamW moments, 12P / gpus (host memory with cpu_offload; gradients are freed
    between steps). "keep_gathered": the faster way of the two that fits at least one response."""
    P, h, v = num_params(s), s["hidden"], s["vocab"]
    state = 0 if cpu_offload else 12 * P / gpus
    kv_row = context * s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * 2  # K and V, bf16
    row = kv_row + 3 * v * 4  # + the sampler's fp32 logits, probabilities and sorted copy
    root = 2 * v * h * (1 if s["tied"] else 2)
    ways = {}
    for way, weights in (("sharded", root + 2 * 2 * layer_params(s)), ("gathered", 2 * P)):
        at_once = int(max(0, gib * GIB - CONTEXT_GIB * GIB - state - weights) // row)
        at_once = min(rows, at_once)
        batches = math.ceil(rows / at_once) if at_once else 0
        read = (2 * P + at_once * kv_row / 2) / (hbm_tbps(gib) * 1e12)  # on average half a full cache
        step_s = read + (2 * P * (gpus - 1) / gpus / (LINK_GBPS * 1e9) if way == "sharded" else 0)
        ways[way] = {"weights_gib": weights / GIB, "at_once": at_once, "batches": batches, "step_s": step_s,
                     "hours": batches * (context - PROMPT_TOKENS) * step_s / 3600}
    fits = [w for w in ways if ways[w]["at_once"]]
    keep = bool(fits) and min(fits, key=lambda w: ways[w]["hours"]) == "gathered"
    return {"state_gib": state / GIB, "kv_gib_per_response": kv_row / GIB, "params": P, "ways": ways,
            "keep_gathered": keep, "fits": bool(fits), "rows": rows, "context": context}


def format_gfpo_plan(plan, gpus, gib):
    """The lines gfpo.py --plan prints: both ways and the one gfpo.py takes."""
    out = [f"GFPO rollout plan per GPU ({gpus} GPUs of {gib:g} GiB, {plan['params'] / 1e9:.2f}B parameters, "
           f"{plan['rows']} responses per rank of up to {plan['context']} tokens):",
           f"  {'sharded state (fp32 weights, AdamW moments)':<52s} {plan['state_gib']:7.1f} GiB",
           f"  {'KV cache of one response':<52s} {plan['kv_gib_per_response']:7.1f} GiB"]
    for way, what in (("sharded", "layers gathered by each forward"),
                      ("gathered", "every layer kept gathered")):
        w = plan["ways"][way]
        out.append(f"  {what:<33s} weights {w['weights_gib']:5.1f} GiB, " + (
            f"{w['at_once']:3d} responses at once, {w['batches']} batches, {w['step_s']:.3f} s a decode "
            f"step: {w['hours']:.1f} h" if w["at_once"] else "no room for one response"))
    verdict = "does NOT fit" if not plan["fits"] else \
        "every layer kept gathered" if plan["keep_gathered"] else "layers gathered by each forward"
    return out + [f"  gfpo.py takes: {verdict}"]
