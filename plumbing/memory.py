"""A memory plan before anything loads: per-GPU and host memory of a train.py run, and of infer.py's
weights and KV cache, from a model's config.json alone (no weights, tokenizer or data).

    python train.py --model Qwen/Qwen2.5-32B-Instruct --plan 8x80                    # exit 0 fits, 3 not
    python train.py --model Qwen/Qwen2.5-32B-Instruct --plan 8x80 --cpu_offload true
    python train.py --model Qwen/Qwen2.5-32B-Instruct --plan 8x141 --simulate         # and the measured step

The terms (FSDP2 over G GPUs, bf16 compute on fp32 weights, GiB = 2^30 bytes; P parameters, H hidden,
I MLP width, D = kv heads x head dim, V vocabulary, n layers, T tokens per training micro-batch, Tm
per matching forward, lp one layer's parameters):
  a, b, c   sharded fp32 weights 4P/G, gradients 4P/G, AdamW moments 8P/G (host memory with --cpu_offload)
  d         foreach AdamW's step temporary, 4P/G; 0 with fused AdamW (train.py on CUDA)
  e         the root FSDP unit (embeddings, lm_head) gathered in bf16: 2VH (4VH untied); twice while its
            all-gather buffer is copied out, at the step's first forward
  g         one layer gathered in bf16, 2lp: the current layer and the next one's all-gather buffer
  h         a layer's gradient reduce: its fp32 reduce-scatter input 4lp and one bf16 weight gradient 2IH
  i         with activation checkpointing, each layer's bf16 input: 2nTH
  j         what one decoder layer saves for backward (all n of them without checkpointing):
            T x [2 (7H + 2D + 4I) + 4 x 2H] bytes (bf16 projections, q/k/v, the four I-wide MLP tensors;
            the two RMSNorms upcast their input to fp32)
  k         gradients in flight through one layer: T x 2 x 2 (I + H) bytes
  l         lm_head's bf16 gradient, 2VH: summed over the loss chunks and reduced with the root's, after
            every layer's backward, so it is alive through the whole layer backward
  m         one 1024-token cross-entropy chunk in backward: three fp32 [1024, V] tensors (the
            log-softmax, the loss's gradient and its gradient through the log-softmax): 12 x 1024 V bytes
  n         the final hidden state, its fp32 norm input, the labelled rows and their gradient: 10TH
  o         the final RMSNorm's backward, six fp32 [T, H] tensors: 24TH
  p, q      one layer's forward working set, T (6I + 8H) bytes (p) and Tm (6I + 8H) without grad (q)
  r         the matching pass's loss chunk (fp32 logits and log-softmax) and hidden rows: 8 x 1024 V + 4TmH
  x         the CUDA context, NCCL buffers, allocator slack: 2 GiB
Each phase holds some of them; the peak is the largest phase:
  matching pass       a c e x + max(e, 2g q, g r): no gradients (zero_grad freed them)
  layers forward      a b c e x 2g i p (a b c e x 2g j without checkpointing): from a step's second
                      micro-batch on, the sharded gradients are alive
  loss                a b c e x g i l + max(n m, n l, o): the loss chunks, then the final norm's backward
  layers backward     a b c e x 2g h i j k l
  optimizer step      a b c d x
`train.py --plan GPUSxGiB --simulate` measures the same phases on the real step (plumbing/simulate.py);
tests/test_simulate.py holds these terms to it within 10%. Sources: PyTorch's FSDP2 design (fully_shard,
MixedPrecisionPolicy, CPUOffloadPolicy), the Qwen2 modelling code of transformers 5.24; test_scale.py
checks the parameter count and the saved-activation bytes against real modules on the CPU.
"""
import json
import math
import os

GIB = 2 ** 30
CE_CHUNK = 1024  # match.SequenceNLL's ce_chunk
CONTEXT_GIB = 2.0  # CUDA context, NCCL, allocator slack per GPU
HOST_BASE_GIB = 4.0  # a rank's process on the host: torch, CUDA and NCCL libraries, pinned buffers
PROMPT_TOKENS = 1024  # prompt length assumed for the matching pass's rows (their K trace tokens follow)


def read_config(config):
    """(a model's config.json as a dict (a multimodal model's text_config), where it was read).
    config: a dict, a local folder holding config.json, or a Hugging Face id (only config.json is
    fetched). Raises ValueError naming the file or the model."""
    where = "the model config"
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
    return config.get("text_config", config), where


def read_shape(config):
    """The shape of a decoder-only transformer from its config.json (read_config's argument) as a
    dict: hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied. Raises ValueError
    naming what is missing."""
    config, where = read_config(config)
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


def prompt_tokens(max_len):
    """The prompt length the plan (and the simulated step) assumes: PROMPT_TOKENS, at most half a row."""
    return min(PROMPT_TOKENS, max_len // 2)


def train_plan(s, gpus, layout="batch", max_len=32768, micro_batch=1, match_batch=8, match_tokens=1000,
               num_forks=6, traces=4, activation_checkpointing=True, cpu_offload=False, fused_adamw=True):
    """{"terms": [(key, what, GiB per GPU)], "phases": [(phase, GiB per GPU, its terms)], "peak_gib_per_gpu",
    "peak_phase", "host_gib_per_rank", "host_gib_other_ranks", "train_tokens", "match_tokens", "params",
    "layers", "context_gib"} of one train.py rank (the module docstring names the terms). Worst case:
    every training row is max_len tokens long (concat rows are bounded by max_len as a whole,
    data.encode_question), prompts are prompt_tokens(max_len) long. traces: M, the traces of a
    question (a concat matching row holds N x M branches)."""
    P, h, v, n, i = num_params(s), s["hidden"], s["vocab"], s["layers"], s["intermediate"]
    lp = layer_params(s)
    T = micro_batch * max_len  # batch: micro_batch sequences; concat: micro_batch questions, each one row
    prompt = prompt_tokens(max_len)
    if layout == "batch":
        match_t = match_batch * (prompt + 1 + min(match_tokens, max_len - prompt - 1))
    else:  # one row per question, the prompt once and N x M branches of K tokens (not cut to max_len)
        room = max(1, (max_len - prompt - traces) // traces)
        rows = max(1, match_batch // (num_forks * traces))
        match_t = rows * (prompt + num_forks * traces * (1 + min(match_tokens, room)))
    state = 0.0 if cpu_offload else 1.0
    ckpt = activation_checkpointing
    g = {"a": ("sharded fp32 weights", state * 4 * P / gpus),
         "b": ("sharded fp32 gradients", state * 4 * P / gpus),
         "c": ("sharded AdamW moments", state * 8 * P / gpus),
         "d": ("AdamW step temporary (0: fused AdamW)", 0 if fused_adamw else state * 4 * P / gpus),
         "e": ("unsharded root (embeddings, lm_head)", 2 * v * h * (1 if s["tied"] else 2)),
         "g": ("one gathered layer (bf16)", 2 * lp),
         "h": ("a layer's gradient reduce (fp32, one bf16 grad)", 4 * lp + 2 * i * h),
         "i": (f"layer-input checkpoints ({n} x {T} tokens)", 2 * n * T * h if ckpt else 0),
         "j": ("one recomputed layer's activations" if ckpt else f"activations of all {n} layers",
               layer_activation_bytes(s, T) * (1 if ckpt else n)),
         "k": ("backward transients", T * 4 * (i + h)),
         "l": ("lm_head gradient (bf16, until the root's reduce)", 2 * v * h),
         "m": ("cross-entropy chunk (fp32)", CE_CHUNK * v * 12),
         "n": ("final hidden, norm input, labelled rows", 10 * T * h),
         "o": ("final RMSNorm backward (fp32)", 24 * T * h),
         "p": ("one layer's forward working set", T * (6 * i + 8 * h)),
         "q": (f"the same in the matching pass ({match_t} tokens)", match_t * (6 * i + 8 * h)),
         "r": ("matching pass: loss chunk and final hidden rows", CE_CHUNK * v * 8 + 4 * match_t * h),
         "x": ("CUDA context, NCCL, slack", CONTEXT_GIB * GIB)}
    b = {k: x / GIB for k, (_, x) in g.items()}
    base = b["a"] + b["b"] + b["c"] + b["e"] + b["x"]  # sharded state, the gathered root, the context
    saved, key = (b["i"], "i") if ckpt else (b["j"], "j")  # what the layers' forward leaves for backward
    phases = [("matching pass", base - b["b"] + max(b["e"], 2 * b["g"] + b["q"], b["g"] + b["r"]),
               "a c e x + max(e, 2g q, g r)"),
              ("layers forward", base + 2 * b["g"] + saved + (b["p"] if ckpt else 0),
               f"a b c e x 2g {key}" + (" p" if ckpt else "")),
              ("loss", base + b["g"] + saved + b["l"] + max(b["n"] + b["m"], b["n"] + b["l"], b["o"]),
               f"a b c e x g {key} l + max(n m, n l, o)"),
              ("layers backward", base + 2 * b["g"] + b["h"] + b["i"] + b["j"] + b["k"] + b["l"],
               f"a b c e x 2g h {'i j' if ckpt else 'j'} k l"),
              ("optimizer step", b["a"] + b["b"] + b["c"] + b["d"] + b["x"], "a b c d x")]
    peak = max(phases, key=lambda ph: ph[1])
    host_state = 16 * P / gpus / GIB + b["d"] * (1 - state) if cpu_offload else 0.0
    rank0_load = 2 * P / GIB + 4 * P / gpus / GIB  # the bf16 checkpoint read whole on rank 0, its fp32 shard
    return {"terms": [(k, what, b[k]) for k, (what, _) in g.items() if ckpt or k != "i"], "phases": phases,
            "peak_gib_per_gpu": peak[1], "peak_phase": peak[0],
            "host_gib_per_rank": HOST_BASE_GIB + max(host_state, rank0_load),
            "host_gib_other_ranks": HOST_BASE_GIB + host_state,
            "train_tokens": T, "match_tokens": match_t, "params": P, "layers": n, "context_gib": CONTEXT_GIB,
            "offload": cpu_offload}


def format_plan(plan, gpus, gib):
    """The table train.py --plan prints (each term, then each phase with the terms it holds), its verdict."""
    out = [f"memory plan per GPU ({gpus} GPUs, {plan['params'] / 1e9:.2f}B parameters, {plan['train_tokens']} "
           f"tokens per training micro-batch, {plan['match_tokens']} per matching forward):"]
    out += [f"  {k}  {what:<52s} {x:7.2f} GiB" for k, what, x in plan["terms"]]
    out += [f"  {f'phase {name} ({terms})':<55s} {x:7.1f} GiB" for name, x, terms in plan["phases"]]
    fits = plan["peak_gib_per_gpu"] <= gib
    peak = f"peak ({plan['peak_phase']})"
    out.append(f"  {peak:<55s} {plan['peak_gib_per_gpu']:7.1f} GiB of {gib:g}: "
               f"{'fits' if fits else 'does NOT fit'}")
    host, other = plan["host_gib_per_rank"], plan["host_gib_other_ranks"]
    out.append(f"  host memory per rank {host:.1f} GiB (rank 0 while loading; the others {other:.1f}), "
               f"{host + (gpus - 1) * other:.0f} GiB for {gpus} ranks")
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
