"""How fast SSFT's code paths run on one device (the overhead claim of Appendix A.1, measured).

Random-init models of Qwen2.5 shapes (no downloads), random token ids; one table, also saved as JSON:
  1. train     train.py's own optimiser step (SequenceNLL under FSDP2: bf16 compute on fp32 weights,
               chunked cross-entropy) against a plain Hugging Face step, `lm(ids, labels=labels).loss
               .backward()` under bf16 autocast on fp32 weights, same attention, recompute, clipping and
               AdamW: tokens/s, MFU and peak memory for the 1.5B and 7B shapes at 8k and 16k tokens.
  2. ssft/sft  the SSFT step (cost matrices, Hungarian, training) over the SFT step on the same data
               (N=6, M=4, K=1000), beside its FLOP floor 1 + N*K / (c*L): matching is one forward over
               N*M*K tokens, training costs c forwards over M*L (c = 3, or 4 with activation recompute;
               L the trace length; prompt tokens left out).
  3. decode    decoding.generate (prompt prefilled once, its KV cache shared by the streams) against
               model.generate on the same prompt and forking tokens, greedy: tokens/s, 6 and 32 streams.
Each number is the median of --iters runs after --warmup, timed between device synchronisations.
MFU = model FLOPs / time / the GPU's dense bf16 peak (n/a on the CPU); a T-token sequence costs
    6 * P * T + 6 * layers * hidden * T^2
in both steps (P: every parameter but the input embedding, lm_head counted even when tied; the second
term is attention's QK^T and AV, 12 * layers * hidden * T^2 forward and backward, halved by the causal
mask; recompute is not counted). Models over --adamw_max_params time both steps without AdamW (the row
says so): 7B's fp32 weights, gradients and two Adam states are 122 GB, more than an 80 GB GPU holds.

    python tools/bench.py --quick                             # tiny shapes on the CPU, ~20 s (what CI runs)
    torchrun --standalone --nproc_per_node 1 tools/bench.py   # one H100/H200, about 6 minutes
"""
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import data
import match
import toy
from plumbing.ranks import close_distributed, init_distributed
from plumbing.files import write_json
from plumbing.flags import parse_flags
from plumbing import batching, decoding, fsdp


@dataclass
class Config:
    quick: bool = False  # tiny shapes, few runs, on the CPU: checks the code paths, the numbers mean nothing
    out: str = "out/bench.json"  # the table as JSON, with the config, device, versions and every run's time
    shapes: str = "1.5b,7b"  # model shapes of the train bench, from SHAPES (quick: tiny)
    seq_lens: str = "8192,16384"  # tokens of the one sequence of a train-bench step (quick: 128,256)
    shape: str = "1.5b"  # model shape of the ssft/sft and decode benches (quick: tiny)
    num_forks: int = 6  # N, forking tokens
    num_traces: int = 4  # M, traces per question
    match_tokens: int = 1000  # K, trace tokens in the matching cost (quick: 16)
    match_batch: int = 8  # rows per no-grad forward of the cost matrix (train.py's default)
    prompt_len: int = 256  # prompt tokens of every question (quick: 32)
    trace_len: int = 8192  # L, tokens of every trace in the ssft/sft bench (quick: 64)
    questions: int = 2  # questions per optimiser step in the ssft/sft bench
    streams: str = "6,32"  # parallel responses to one prompt in the decode bench
    new_tokens: int = 128  # tokens decoded per stream; no stop token, so every stream decodes all (quick: 8)
    activation_checkpointing: bool = True  # recompute decoder layers in backward, in both steps (c = 4)
    adamw_max_params: float = 4e9  # larger models time forward + backward + clip without the AdamW step
    warmup: int = 2  # untimed runs before each measurement (quick: 1)
    iters: int = 5  # timed runs per measurement; the table shows their median (quick: 3)
    peak_tflops: float = 0.0  # dense bf16 TFLOP/s of the GPU for MFU (0: datasheet value of a known GPU)
    device: str = ""  # cuda or cpu ('' = cuda when available; quick: cpu)
    cpu_threads: int = 0  # torch's CPU threads (0: its default; quick: 1, steady on a shared machine)


QUICK = dict(shapes="tiny", seq_lens="128,256", shape="tiny", match_tokens=16, prompt_len=32, trace_len=64,
             new_tokens=8, warmup=1, iters=3, device="cpu", cpu_threads=1)
SHAPES = {  # as in the config.json of Qwen2.5-1.5B and -7B; tiny for --quick
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, tie_word_embeddings=True),
}
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "B200": 2250, "A100": 312}  # dense bf16, datasheets


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**{**(QUICK if given.get("quick") else {}), **given})
    unknown = [s for s in cfg.shapes.split(",") + [cfg.shape] if s not in SHAPES]
    if unknown or cfg.iters < 1 or cfg.warmup < 0 or min(ints(cfg.seq_lens)) < cfg.prompt_len + 2:
        parser.error(f"need shapes from {list(SHAPES)} (got {unknown}), --iters >= 1, --warmup >= 0 and "
                     "--seq_lens > --prompt_len + 1")
    return cfg


def ints(text):
    return [int(x) for x in text.split(",")]


# ----------------------------------------------------------------------------- timing and models

def measure(label, fn, cfg, device):
    """{"s": median seconds, "times", "peak_gib", "value": fn's last result} of cfg.iters runs of fn
    after cfg.warmup untimed ones, each between device synchronisations (CUDA kernels run
    asynchronously: time them, not their launch); None when the device runs out of memory."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, value = [], None
    try:
        for _ in range(cfg.warmup + cfg.iters):
            sync()
            t0 = time.perf_counter()
            value = fn()
            sync()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        times = None
    free_memory(device)
    median = statistics.median(times[cfg.warmup:]) if times else None
    print(f"  {label}: " + (f"median {median:.4g} s" if times else "out of memory"), file=sys.stderr, flush=True)
    if times is None:
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"s": median, "times": times[cfg.warmup:], "peak_gib": peak, "value": value}


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_lm(shape, device, dtype, attn):
    """A random-init Qwen2 causal LM of one of SHAPES, built directly on `device`, and its
    (parameter count, P of the MFU formula)."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, use_cache=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    params = sum(p.numel() for p in lm.parameters())  # a tied lm_head is counted once here
    return lm, params, params if config.tie_word_embeddings else params - lm.get_input_embeddings().weight.numel()


def random_question(rng, prompt_len, trace_lens, low, high):
    """An encoded question as data.encode_question returns it, with random ids in [low, high)."""
    ids = lambda n: rng.integers(low, high, n).tolist()
    return {"prompt_ids": ids(prompt_len), "trace_ids": [ids(n) for n in trace_lens], "truncated": 0}


# ----------------------------------------------------------------------------- the steps

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-5, (0.9, 0.95), 1e-4, 1.0  # train.py's defaults (tests/test_bench.py)


def ssft_step(model, optimizer, encoded, fork_ids, matching, cfg, pad_id, device):
    """train.py's optimiser step on one device, its logging left out: the matching pass
    (match.match_questions, Eq. 3-4), then Eq. 5 over the matched pairs one sequence per micro-batch
    (train.py's default micro-batch), the loss a sum over trace tokens divided by their number,
    gradient clipping and AdamW. tests/test_bench.py holds its gradients equal to train.training_pass's."""
    rngs = [np.random.default_rng([0, i]) for i in range(len(encoded))]
    matched = match.match_questions(model, encoded, fork_ids, matching, cfg.match_tokens, cfg.match_batch, pad_id,
                                    device, rngs)
    rows = [data.make_sequence(q["prompt_ids"], fork_ids[f], q["trace_ids"][j])
            for q, m in zip(encoded, matched) for f, j in zip(m.forks, m.traces)]
    tokens = sum(len(q["trace_ids"][j]) for q, m in zip(encoded, matched) for j in m.traces)
    model.train()
    for row in rows:
        input_ids, labels, attention_mask = (t.to(device) for t in batching.collate([row], pad_id))
        nll_sum, _ = model(input_ids, labels, attention_mask)
        (nll_sum.sum() / tokens).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def hf_step(lm, optimizer, input_ids, labels, grad_clip, device):
    """The plain Hugging Face step: fp32 weights, bf16 autocast on CUDA, full-vocabulary logits."""
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        loss = lm(input_ids=input_ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(lm.parameters(), grad_clip)
    if optimizer is not None:
        optimizer.step()
    lm.zero_grad(set_to_none=True)


def adamw(model, params, cfg):
    """train.py's optimiser, or None above --adamw_max_params."""
    if params > cfg.adamw_max_params:
        return None
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)


# ----------------------------------------------------------------------------- the benches

def bench_train(cfg, shape, device, fork_ids, pad_id, low, peak):
    """Rows of bench 1: train.py's step against the plain HF step, one model in memory at a time."""
    lens, rng, res = ints(cfg.seq_lens), np.random.default_rng(0), {}
    questions = {t: [random_question(rng, cfg.prompt_len, [t - cfg.prompt_len - 1], low, SHAPES[shape]["vocab_size"])]
                 for t in lens}
    for path in ("train.py", "HF"):
        lm, params, matmul_params = build_lm(shape, device, torch.float32, fsdp.attention_backend("batch", device))
        if path == "train.py":
            model = fsdp.shard(lm, device, match.SequenceNLL, cfg.activation_checkpointing)
        else:
            if cfg.activation_checkpointing:  # the same call as fsdp.shard's
                fsdp.checkpoint_layers(lm)
            model = lm.train()
        optimizer = adamw(model, params, cfg)
        for t, enc in questions.items():
            if path == "train.py":  # sft: no cost matrix, a one-trace question is one row
                res[path, t] = measure(f"train {path} {shape} {t}", lambda: ssft_step(
                    model, optimizer, enc, fork_ids, "sft", cfg, pad_id, device), cfg, device)
            else:
                seq = data.make_sequence(enc[0]["prompt_ids"], fork_ids[0], enc[0]["trace_ids"][0])
                ids, labels, _ = (x.to(device) for x in batching.collate([seq], pad_id))
                res[path, t] = measure(f"train {path} {shape} {t}", lambda: hf_step(
                    lm, optimizer, ids, labels, GRAD_CLIP, device), cfg, device)
        lm = model = optimizer = None  # frees the model before the next one is built
        free_memory(device)
    what = "fwd+bwd+clip+AdamW" if params <= cfg.adamw_max_params else "fwd+bwd+clip, no AdamW (memory)"
    s = SHAPES[shape]
    flops = lambda t: 6 * matmul_params * t + 6 * s["num_hidden_layers"] * s["hidden_size"] * t ** 2
    return [row("train tok/s: train.py | HF", f"{shape} {t} tok", res["train.py", t], res["HF", t],
                lambda r, t=t: t / r["s"], what, mfu=lambda r, t=t: flops(t) / r["s"] / peak if peak else None)
            for t in lens]


def bench_ssft(cfg, device, fork_ids, pad_id, low):
    """Bench 2: the SSFT step over the SFT step, both train.py's, on the same questions and model."""
    rng, L = np.random.default_rng(1), cfg.trace_len
    encoded = [random_question(rng, cfg.prompt_len, [L] * cfg.num_traces, low, SHAPES[cfg.shape]["vocab_size"])
               for _ in range(cfg.questions)]
    lm, params, _ = build_lm(cfg.shape, device, torch.float32, fsdp.attention_backend("batch", device))
    model = fsdp.shard(lm, device, match.SequenceNLL, cfg.activation_checkpointing)
    optimizer = adamw(model, params, cfg)
    res = {m: measure(f"step {m}", lambda: ssft_step(model, optimizer, encoded, fork_ids, m, cfg, pad_id, device),
                      cfg, device) for m in ("hungarian", "sft")}
    lm = model = optimizer = None
    c = 4 if cfg.activation_checkpointing else 3
    floor = 1 + cfg.num_forks * min(cfg.match_tokens, L) / (c * L)
    return [{**row("ssft/sft step s: SSFT | SFT", f"{cfg.shape} N{cfg.num_forks} M{cfg.num_traces} K{cfg.match_tokens} "
                   f"L{L}", res["hungarian"], res["sft"], lambda r: r["s"], f"FLOP floor 1+NK/(cL) = {floor:.3f} (c={c})"),
             "floor": floor}]


def bench_decode(cfg, device, fork_ids, pad_id, low):
    """Bench 3: tokens/s of decoding.generate against model.generate, one prompt, S greedy streams."""
    rng = np.random.default_rng(3)
    prompt = random_question(rng, cfg.prompt_len, [], low, SHAPES[cfg.shape]["vocab_size"])["prompt_ids"]
    lm = build_lm(cfg.shape, device, torch.bfloat16 if device.type == "cuda" else torch.float32, "sdpa")[0].eval()
    rows = []
    for s in ints(cfg.streams):
        firsts = [fork_ids[i % len(fork_ids)] for i in range(s)]  # infer.py's --fork all, cycle order
        batch = torch.tensor([prompt + f for f in firsts], device=device)

        def hf_generate():
            out = lm.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=False, top_p=None,
                              top_k=None, temperature=None, max_new_tokens=cfg.new_tokens, eos_token_id=None,
                              pad_token_id=pad_id, use_cache=True)
            return (out.shape[1] - batch.shape[1]) * s
        ours = measure(f"decode infer {s}", lambda: sum(len(ids) for ids, _ in decoding.generate(
            lm, prompt, firsts, cfg.new_tokens, 0.0, 1.0, set(), torch.Generator(device))), cfg, device)
        rows.append(row("decode tok/s: infer | HF", f"{cfg.shape} {s} streams P{len(prompt)}", ours,
                        measure(f"decode HF {s}", hf_generate, cfg, device), lambda r: r["value"] / r["s"],
                        f"greedy, {cfg.new_tokens} new tokens per stream"))
    return rows


def row(bench, case, a, b, metric, note, mfu=lambda r: None):
    """One table row: A and B as `metric` of their measurements (None: out of memory)."""
    value = lambda r: metric(r) if r else None
    return {"bench": bench, "case": case, "a": value(a), "b": value(b),
            "ratio": value(a) / value(b) if a and b else None, "note": note,
            "mfu": [mfu(r) if r else None for r in (a, b)], "peak_gib": [r["peak_gib"] if r else None for r in (a, b)],
            "times_s": [r["times"] if r else None for r in (a, b)]}


def summary(rows, cfg):
    """The five ratios the performance targets are stated in (None where a row is missing or ran out
    of memory): train.py's step over the plain HF step (first shape and length), the 7B MFU, the
    SSFT/SFT step time over its FLOP floor, and the shared-prefix decoding over model.generate."""
    def find(bench, case):
        return next((r for r in rows if r["bench"].startswith(bench) and r["case"].startswith(case)), None)
    first = f"{cfg.shapes.split(',')[0]} {ints(cfg.seq_lens)[0]} tok"
    train_row, big, ssft = find("train", first), find("train", f"7b {ints(cfg.seq_lens)[0]} tok"), find("ssft", "")
    decode = {s: find("decode", f"{cfg.shape} {s} streams") for s in (6, 32)}
    return {"train_speedup_vs_hf": train_row and train_row["ratio"],
            "mfu_7b": big and big["mfu"][0],
            "ssft_overhead_over_floor": ssft and ssft["ratio"] and ssft["ratio"] / ssft["floor"],
            "decode_speedup_vs_generate_6": decode[6] and decode[6]["ratio"],
            "decode_speedup_vs_generate_32": decode[32] and decode[32]["ratio"]}


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def main(cfg):
    _, world, _ = init_distributed()  # plain python: a world of one; torchrun: NCCL
    if world != 1:
        sys.exit("error: bench.py measures one device: run it with python, or torchrun --nproc_per_node 1")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = 1e12 * (cfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), 0)) \
        if device.type == "cuda" else 0
    import transformers
    env = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "backend": dist.get_backend(), "peak_tflops": peak / 1e12 or None,
           "load_average": os.getloadavg()}
    print(json.dumps(dataclasses.asdict(cfg)))
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    tokenizer = toy.make_tokenizer()  # only for a PAD id and N forking-token ids; all text is random ids
    fork_ids = data.fork_ids(tokenizer, cfg.num_forks)  # [[id], ...]: one reserved token per tag
    pad_id, low = tokenizer.pad_token_id, len(tokenizer)  # random ids lie above the forking tokens
    t0 = time.time()
    rows = [r for shape in cfg.shapes.split(",") for r in bench_train(cfg, shape, device, fork_ids, pad_id, low, peak)]
    for bench in (bench_ssft, bench_decode):
        # saved before each stage: a run stopped at its time cap (gpu_check.sh) keeps what it measured
        save(cfg, name, env, rows, None)
        rows += bench(cfg, device, fork_ids, pad_id, low)
        free_memory(device)
    print(f"\n{'bench':<32}{'case':<30}{'A':>11}{'B':>11}{'A/B':>7}{'MFU A|B':>14}{'peak GiB A|B':>15}  note")
    for r in rows:
        mfu, mem = (" | ".join(fmt(x, s) for x in r[k]) for k, s in (("mfu", ".1%"), ("peak_gib", ".1f")))
        print(f"{r['bench']:<32}{r['case']:<30}{fmt(r['a'], '11.4g')}{fmt(r['b'], '11.4g')}"
              f"{fmt(r['ratio'], '7.3f')}{mfu:>14}{mem:>15}  {r['note']}")
    result = summary(rows, cfg)
    print(f"A, B: medians; n/a: out of memory, or MFU and memory on the CPU. {time.time() - t0:.0f} s, {cfg.out}")
    print("summary: " + json.dumps(result))
    save(cfg, name, env, rows, result)
    close_distributed()
    return rows


def save(cfg, name, env, rows, result):
    """bench.json: the rows so far and the summary (None while the run is under way)."""
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    write_json(cfg.out, {"device": name, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                         "config": dataclasses.asdict(cfg), "env": env, "rows": rows, "summary": result})


if __name__ == "__main__":
    main(parse_config())
