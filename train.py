"""Set Supervised Fine-Tuning (Algorithm 1) in a hand-rolled FSDP2 loop.

Each optimiser step takes whole questions holding `batch_size` traces in all (the paper's global batch
of 32 sequences, Appendix A.3.2), shares them over the ranks (Algorithm 2) and runs
  1. the matching pass: the N x M cost matrix of each question (Eq. 4, no grad, eval mode) and its
     matching (Eq. 3: Hungarian, or random / sft for the baselines);
  2. the training pass: the NTP loss of every matched (forking token, trace) sequence (Eq. 5), in
     micro-batches of `micro_batch` sequences with gradient accumulation, normalised by the number
     of trace tokens over all ranks and micro-batches.

    python train.py                                     # toy task, tiny model, CPU, about a minute
    python train.py --matching random                   # the random-matching ablation
    torchrun --standalone --nproc_per_node 8 train.py --model Qwen/Qwen2.5-32B-Instruct \\
        --data s1k_4mixed.jsonl --out_dir out/ssft-32b   # Appendix A.3.2 defaults
    # two nodes: the same on each, with --nnodes 2 --node_rank {0,1} --rdzv_backend c10d
    #   --rdzv_endpoint HOST0:29500 --rdzv_id ssft in place of --standalone

Rerunning the same command on an existing --out_dir resumes from its last complete checkpoint.
"""
import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import data
import match
import toy
from plumbing.ranks import STOP, all_max, all_sum, close_distributed, init_distributed, print0, stage_run
from plumbing.files import DataError, append_jsonl, changed_settings, read_json, read_jsonl, writable_dir, write_json, write_jsonl
from plumbing.flags import parse_flags
from plumbing import batching, concat, datafiles, fsdp, memory, simulate


@dataclass
class Config:
    model: str = "toy"  # Hugging Face id or path, or "toy" (a tiny Qwen2 built in-process)
    data: str = "toy"  # JSONL or Parquet file (see data.py for the layouts), or "toy" (toy.py's task)
    out_dir: str = "out/ssft"  # config.json, metrics.jsonl, matching.json, checkpoints/, final/
    num_forks: int = 6  # N, the number of global forking tokens <think1>..<thinkN> (toy: 4)
    fork_style: str = "special"  # special: reserved tokens <thinkI>; text: "<|im_start|><thinkI>\n" as text (data.py)
    match_tokens: int = 1000  # K: the matching cost uses the first K tokens of each trace (Eq. 4) (toy: 4)
    matching: str = "hungarian"  # hungarian (SSFT) | random (ablation) | sft (one token, SFT-mixed)
    layout: str = "batch"  # batch: one row per (token, trace); concat: one row per question (A.5) (toy: concat)
    epochs: int = 6  # passes over the questions (toy: 4)
    max_steps: int = 0  # stop after this many optimiser steps in all (0: run all epochs)
    lr: float = 1e-5  # peak learning rate, 5% linear warm-up then cosine to 0 (toy: 3e-3)
    batch_size: int = 32  # sequences (traces) per optimiser step over all ranks; whole questions (toy: 64)
    micro_batch: int = 1  # rows per forward/backward in the training pass: sequences, or questions for concat (toy: 8 questions)
    match_batch: int = 8  # sequences per no-grad forward in the matching pass (toy: 256)
    max_len: int = 32768  # tokens of a row: prompt + tag + trace (batch), prompt + every tag + trace (concat); traces are cut to fit (toy: 256)
    seed: int = 0  # data order, random matchings and new embedding rows all derive from it
    save_every: int = 50  # a resumable checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept, the newest; older ones go once a newer one is complete (0: all)
    warmup: float = 0.05  # fraction of the steps spent in linear warm-up
    weight_decay: float = 1e-4  # AdamW weight decay (betas 0.9, 0.95)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    activation_checkpointing: bool = True  # recompute decoder layers in backward (toy: off)
    cpu_offload: bool = False  # keep sharded params, grads and AdamW states in CPU memory (FSDP2)
    skip_nonfinite: bool = False  # skip a batch whose loss is not finite instead of stopping
    toy_questions: int = 2000  # number of training questions of the toy task
    trust_remote_code: bool = False  # let transformers run code shipped with the model
    plan: str = ""  # GPUSxGiB, e.g. 8x80: print the memory plan of these flags from config.json alone, exit 0 if it fits, 3 if not
    simulate: bool = False  # with --plan: also measure this step on fake tensors on the CPU (plumbing/simulate.py)


RESUME_FREE = {"max_steps", "save_every", "skip_nonfinite", "out_dir", "keep_checkpoints", "plan", "simulate"}  # may change on resume
MAX_FORKS = 1024  # bound on --num_forks: each is a vocabulary entry and N forwards per trace and step


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    toy_defaults = toy.train_defaults(given.get("layout")) if given.get("model", Config.model) == "toy" else {}
    cfg = Config(**{**toy_defaults, **given})
    problems = [f"--num_forks must be from 1 to {MAX_FORKS} (got {cfg.num_forks})"
                if not 1 <= cfg.num_forks <= MAX_FORKS else None,
                f"--match_tokens must be >= 1 (got {cfg.match_tokens})" if cfg.match_tokens < 1 else None,
                f"--max_len must be >= 2 (got {cfg.max_len})" if cfg.max_len < 2 else None,
                f"--matching must be hungarian, random or sft (got {cfg.matching!r})"
                if cfg.matching not in ("hungarian", "random", "sft") else None,
                f"--layout must be batch or concat (got {cfg.layout!r})" if cfg.layout not in ("batch", "concat") else None,
                f"--fork_style must be special or text (got {cfg.fork_style!r})" if cfg.fork_style not in data.FORK_STYLES
                else None,
                *(f"--{k} must be >= 1 (got {getattr(cfg, k)})" for k in
                  ("epochs", "batch_size", "micro_batch", "match_batch", "toy_questions") if getattr(cfg, k) < 1),
                f"--lr must be > 0 (got {cfg.lr})" if not cfg.lr > 0 else None,
                f"--grad_clip must be > 0 (got {cfg.grad_clip})" if not cfg.grad_clip > 0 else None,
                f"--warmup must be in [0, 1) (got {cfg.warmup})" if not 0 <= cfg.warmup < 1 else None,
                f"--weight_decay must be >= 0 (got {cfg.weight_decay})" if not cfg.weight_decay >= 0 else None,
                "--max_steps, --save_every and --keep_checkpoints must be >= 0"
                if min(cfg.max_steps, cfg.save_every, cfg.keep_checkpoints) < 0 else None]
    if cfg.plan:
        try:
            memory.parse_gpus(cfg.plan)
        except ValueError as e:
            problems.append(str(e))
    elif cfg.simulate:
        problems.append("--simulate needs --plan GPUSxGiB")
    problems = [p for p in problems if p]
    if problems:
        parser.error("; ".join(problems))
    return cfg


# ----------------------------------------------------------------------------- model

def load_tokenizer(cfg):
    """(tokenizer with the forking tokens, the token ids of each forking tag, the vocabulary size
    before any was added)."""
    from transformers import AutoTokenizer
    if cfg.model == "toy":
        tokenizer = toy.make_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    num_trained = len(tokenizer)
    return tokenizer, data.fork_ids(tokenizer, cfg.num_forks, cfg.fork_style), num_trained


def load_model(cfg, tokenizer, fork_ids, num_trained, rank, device):
    """(SequenceNLL-wrapped FSDP2 model, hf_config) of --model, its new forking-token rows initialised
    (special style; text tags are ordinary tokens, already trained): fsdp.load_model."""
    def init_fork_rows(full):
        if cfg.fork_style == "special":
            data.init_fork_rows(full, [ids[0] for ids in fork_ids], num_trained, cfg.seed)
    source = (lambda: toy.make_model(tokenizer)) if cfg.model == "toy" else cfg.model
    return fsdp.load_model(source, rank, device, match.SequenceNLL, cfg.layout, cfg.seed, cfg.activation_checkpointing,
                           cfg.cpu_offload, cfg.trust_remote_code, edit=init_fork_rows)


# ----------------------------------------------------------------------------- schedule

def lr_at(step, total, peak, warmup):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine to 0 (Appendix A.3.2)."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def epoch_batches(sizes, batch_size, seed, epoch):
    """The optimiser steps of one epoch, each a list of question indices. sizes[q]: question q's
    number of traces, the sequences it trains (under SSFT, N of them if M > N). Questions are taken
    in the epoch's seeded order and packed until a step holds batch_size sequences: a question's
    traces stay in one step (its matching needs all of them), so a question that would overflow
    starts the next step, and one larger than batch_size is a step of its own. Every question
    trains once per epoch."""
    steps, held = [], 0
    for q in np.random.default_rng([seed, epoch]).permutation(len(sizes)).tolist():
        if not steps or held + sizes[q] > batch_size:
            steps.append([])
            held = 0
        steps[-1].append(q)
        held += sizes[q]
    return steps


def schedule(sizes, batch_size, seed, epochs):
    """[(epoch, question indices)] of every optimiser step of the run: a pure function of the data
    and the seed, so that a resumed run takes the same steps as an uninterrupted one."""
    return [(e, batch) for e in range(epochs) for batch in epoch_batches(sizes, batch_size, seed, e)]


# ----------------------------------------------------------------------------- one step

def training_rows(questions, matched, fork_ids, layout):
    """The rows to train: one per matched (token, trace) pair (batch layout), or one per question
    with its matched branches after a single copy of the prompt (concat layout, Appendix A.5).
    questions: encoded questions; matched: their match.Matching records, in the same order."""
    if layout == "batch":
        return [data.make_sequence(q["prompt_ids"], fork_ids[f], q["trace_ids"][j])
                for q, m in zip(questions, matched) for f, j in zip(m.forks, m.traces)]
    return [concat.make_branches(q["prompt_ids"], [(fork_ids[f], q["trace_ids"][j]) for f, j in zip(m.forks, m.traces)])
            for q, m in zip(questions, matched)]


def model_inputs(rows, layout, pad_id, device):
    """A micro-batch as the keyword arguments of SequenceNLL.forward. Concat rows on CUDA are padded
    to concat.bucket_length: FlexAttention then compiles one graph per bucket, not one per length."""
    if layout == "batch":
        input_ids, labels, attention_mask = (t.to(device) for t in batching.collate(rows, pad_id))
        return dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask)
    input_ids, labels, position_ids, branch_ids = (t.to(device) for t in concat.collate_branches(
        rows, pad_id, bucket=device.type == "cuda"))
    return dict(input_ids=input_ids, labels=labels, attention_mask=concat.tree_attention(branch_ids),
                position_ids=position_ids)


def training_pass(model, rows, micro_batch, layout, pad_id, device):
    """Eq. 5 over this rank's rows (training_rows), questions stitched together in one queue and cut
    into micro-batches (the same number on every rank, PAD-filled). Gradients accumulate; the loss
    is the sum of token NLLs divided by the number of trace tokens over all ranks (not a mean of
    per-rank means). Returns (loss, global trace tokens, global input tokens, padding fraction: the
    share of the computed positions that are padding)."""
    world = dist.get_world_size()
    n_batches = all_max(batching.num_micro_batches(len(rows), micro_batch), device)
    batches, _ = batching.micro_batches(rows, micro_batch, n_batches, batching.pad_item(pad_id, layout))
    local_tokens = sum(sum(label != batching.IGNORE for label in row[1]) for row in rows)
    computed = sum(len(mb) * max(len(row[0]) for row in mb) for mb in batches)
    global_tokens, global_input, global_computed = all_sum(
        [local_tokens, sum(len(row[0]) for row in rows), computed], device)
    loss_sum = torch.zeros((), device=device)
    model.train()
    for mb in batches:
        nll_sum, _ = model(**model_inputs(mb, layout, pad_id, device))
        # x world: FSDP averages gradients over ranks, and we want the global sum / global tokens
        (nll_sum.sum() / max(global_tokens, 1) * world).backward()
        loss_sum += nll_sum.sum().detach()
    loss = all_sum([loss_sum.item()], device)[0] / max(global_tokens, 1)
    return loss, global_tokens, global_input, 1 - global_input / global_computed


# ----------------------------------------------------------------------------- --plan --simulate

def simulated_step(cfg, traces=4, device=torch.device("cpu")):
    """(build, step) for plumbing/simulate.py. build(layers): the FSDP2 model of --model's config.json
    cut to `layers` decoder layers, and its fused AdamW. step: this file's optimiser step of one rank,
    on synthetic questions at the plan's worst case: M = `traces` traces per question, every
    training row --max_len tokens after a prompt of memory.prompt_tokens, two micro-batches (from the
    second on, the sharded gradients are alive through the backward; more add nothing to the peak).
    device: CPU, whose fake tensors under the CUDA precision policy stand for the GPU's (test_gpu.py
    runs the same step on CUDA)."""
    config = toy.make_model(toy.make_tokenizer()).config.to_dict() if cfg.model == "toy" else \
        memory.read_config(cfg.model)[0]

    def build(layers):
        model = fsdp.shard(simulate.meta_model(config, layers), device, match.SequenceNLL,
                           cfg.activation_checkpointing, cfg.cpu_offload, cuda_policy=True)
        model.to_empty(device=device)
        return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                        weight_decay=cfg.weight_decay, fused=True)
    prompt = [1] * memory.prompt_tokens(cfg.max_len)
    # rows of --max_len tokens: prompt + tag + trace (batch), prompt + M x (tag + trace) (concat)
    trace = [2] * (cfg.max_len - len(prompt) - 1 if cfg.layout == "batch"
                   else max(1, (cfg.max_len - len(prompt) - traces) // traces))
    per_question = traces if cfg.matching == "sft" else min(cfg.num_forks, traces)  # rows a question trains
    questions = math.ceil(2 * cfg.micro_batch / (per_question if cfg.layout == "batch" else 1))
    encoded = [{"prompt_ids": prompt, "trace_ids": [trace] * traces}] * questions
    fork_ids = [[3 + i] for i in range(cfg.num_forks)]

    def step(model, optimizer, phase):
        phase("matching pass")
        rngs = [np.random.default_rng([cfg.seed, q]) for q in range(questions)]
        matched = match.match_questions(model, encoded, fork_ids, cfg.matching, cfg.match_tokens,
                                        cfg.match_batch, 0, device, rngs, None, cfg.layout)
        phase("training pass")
        rows = training_rows(encoded, matched, fork_ids, cfg.layout)
        training_pass(model, rows, cfg.micro_batch, cfg.layout, 0, device)
        phase("optimizer step")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return build, step


# ----------------------------------------------------------------------------- main

def prepare(cfg):
    """Every check that needs no model, on every rank alike: the data, the tokenizer, --out_dir and
    what it holds. Bad input stops here with one message, before a model loads or a file is written.
    Returns (questions, encoded questions, tokenizer, fork ids, number of trained vocabulary rows)."""
    if cfg.cpu_offload and not torch.cuda.is_available():
        raise DataError("--cpu_offload offloads from GPU memory and needs CUDA devices")
    questions = toy.make_questions(cfg.toy_questions, cfg.seed) if cfg.data == "toy" else datafiles.load_questions(cfg.data)
    changed = changed_settings(os.path.join(cfg.out_dir, "config.json"), cfg,
                               [f.name for f in dataclasses.fields(Config) if f.name not in RESUME_FREE])
    if changed:
        raise DataError(f"{cfg.out_dir} holds a run with other settings ({', '.join(changed)}); "
                        "resume with the same flags or choose another --out_dir")
    try:
        tokenizer, fork_ids, num_trained = load_tokenizer(cfg)
    except (OSError, ValueError) as e:
        raise DataError(f"--model {cfg.model}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    encoded = [data.encode_question(tokenizer, q, cfg.max_len, max(map(len, fork_ids)), cfg.layout) for q in questions]
    done = fsdp.checkpoints(cfg.out_dir)
    if cfg.max_steps and done and done[-1][0] > cfg.max_steps:
        raise DataError(f"{cfg.out_dir} holds a checkpoint at step {done[-1][0]}, past --max_steps {cfg.max_steps}: "
                        "a run never goes back; choose another --out_dir to train fewer steps")
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    if done and os.path.exists(metrics):  # its lines before the checkpoint are kept: they must read
        read_jsonl(metrics, drop_truncated_tail=True)
    writable_dir(cfg.out_dir)
    return questions, encoded, tokenizer, fork_ids, num_trained


def memory_plan(cfg, gpus, traces=4):
    """memory.train_plan of this run's flags on `gpus` GPUs from --model's config.json alone (fused
    AdamW: train.py's optimiser on CUDA). traces: M, the most traces of a question."""
    shape = memory.read_shape(toy.make_model(toy.make_tokenizer()).config.to_dict() if cfg.model == "toy"
                              else cfg.model)
    return memory.train_plan(shape, gpus, cfg.layout, cfg.max_len, cfg.micro_batch, cfg.match_batch, cfg.match_tokens,
                             cfg.num_forks, traces, cfg.activation_checkpointing, cfg.cpu_offload, fused_adamw=True)


PLAN_HINT = ("to fit: --cpu_offload true (sharded state to host memory), a smaller --max_len or --micro_batch, "
             "--activation_checkpointing true, or more GPUs (docs/scaling.md)")


def print_plan(cfg):
    """--plan GPUSxGiB: the memory table of these flags, then one JSON line; exit 0 if it fits, 3 if not.
    Reads only --model's config.json: no weights, tokenizer or data."""
    gpus, gib = memory.parse_gpus(cfg.plan)
    try:
        plan = memory_plan(cfg, gpus)
    except ValueError as e:
        sys.exit(f"error: {e}")
    lines, fits = memory.format_plan(plan, gpus, gib)
    print("\n".join(lines + ([] if fits else [f"  {PLAN_HINT}"])), flush=True)
    simulated = {}
    if cfg.simulate and simulate.missing():
        print(f"--simulate: skipped, {simulate.missing()}")
    elif cfg.simulate:  # the same phases measured on this file's step, on fake tensors
        sim = simulate.simulate(*simulated_step(cfg), plan["layers"], gpus, cfg.cpu_offload)
        print("\n".join(simulate.format_comparison(plan, sim, gpus)))
        simulated = {"simulated_peak_gib": round(max(sim["phases"].values()), 2),
                     "simulated_s": round(sim["seconds"]), "simulated_host_gib": round(sim["host_gib"], 2)}
    print(json.dumps({"peak_gib_per_gpu": round(plan["peak_gib_per_gpu"], 1),
                      "host_gib_per_rank": round(plan["host_gib_per_rank"], 1), "fits": fits, "gpus": gpus,
                      "gib_per_gpu": gib, "layout": cfg.layout, "max_len": cfg.max_len,
                      "micro_batch": cfg.micro_batch, "cpu_offload": cfg.cpu_offload, **simulated}))
    sys.exit(0 if fits else 3)


def main(cfg):
    if cfg.plan:
        print_plan(cfg)
    try:
        questions, encoded, tokenizer, fork_ids, num_trained = prepare(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    rank, world, device = init_distributed()
    try:
        with stage_run(cfg.out_dir, rank):
            train(cfg, questions, encoded, tokenizer, fork_ids, num_trained, rank, world, device)
    finally:
        close_distributed()


def train(cfg, questions, encoded, tokenizer, fork_ids, num_trained, rank, world, device):
    """Algorithm 1 from the model's loading to final/, on every rank."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = schedule([len(q["traces"]) for q in questions], cfg.batch_size, cfg.seed, cfg.epochs)
    total_steps = len(plan)
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    final = os.path.join(cfg.out_dir, "final")
    done = fsdp.checkpoints(cfg.out_dir)
    if done and done[-1][0] >= last_step and os.path.isdir(final):
        if rank == 0:  # nothing to train; a matching.json that no longer reads is rebuilt, exactly
            try:
                read_json(os.path.join(cfg.out_dir, "matching.json"))
            except DataError:
                write_json(os.path.join(cfg.out_dir, "matching.json"),
                           read_json(os.path.join(done[-1][1], "trainer_state.json"))["matching"])
        print0(f"{cfg.out_dir}: complete at step {done[-1][0]}; final/ holds its model")
        return

    if device.type == "cuda":  # refuse before loading 65 GB what cannot fit the GPUs we are on
        gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
        lines, fits = memory.format_plan(memory_plan(cfg, world, max(len(q["traces"]) for q in questions)), world, gib)
        print0("\n".join(lines))
        if not fits:
            sys.exit(f"error: these flags do not fit {world} x {gib:.0f} GiB; {PLAN_HINT}")
        if cfg.layout == "concat":  # one FlexAttention graph per row-width bucket (concat.bucket_length)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       concat.num_buckets(cfg.max_len) + 2)
    if cfg.cpu_offload:  # torchrun sets OMP_NUM_THREADS=1: the offloaded AdamW step would use one core
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    model, hf_config = load_model(cfg, tokenizer, fork_ids, num_trained, rank, device)
    # fused AdamW on CUDA: the foreach path allocates a temporary the size of the sharded state at step()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  fused=True if device.type == "cuda" else None)
    fork_names = data.fork_tokens(cfg.num_forks)
    try:
        start, stats = fsdp.resume(model, optimizer, cfg.out_dir, rank, device,
                                   lambda state: match.MatchingStats.from_json(state["matching"]))
    except DataError as e:
        sys.exit(f"error: {e}")
    stats = stats or match.MatchingStats(cfg.matching, fork_names, cfg.fork_style)
    metrics_path, matching_path = (os.path.join(cfg.out_dir, f) for f in ("metrics.jsonl", "matching.json"))
    if rank == 0:
        write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg))
        # keep the lines logged before the checkpoint we resume from (none for a fresh run), and
        # not a line cut by a kill; matching.json is rebuilt from the checkpoint's statistics
        keep = [r for _, r in read_jsonl(metrics_path, drop_truncated_tail=True) if r["step"] < start] \
            if start else []
        write_jsonl(metrics_path, keep)
        write_json(matching_path, stats.to_json())
    print0(json.dumps(dataclasses.asdict(cfg)))
    per_epoch = [sum(e == epoch for e, _ in plan) for epoch in range(cfg.epochs)]
    per_epoch = str(min(per_epoch)) if min(per_epoch) == max(per_epoch) else f"{min(per_epoch)} to {max(per_epoch)}"
    print0(f"{len(questions)} questions, {sum(len(q['traces']) for q in questions)} traces "
           f"({sum(e['truncated'] for e in encoded)} truncated to --max_len {cfg.max_len}"
           f"{', cut evenly so that each question row fits it' if cfg.layout == 'concat' else ''}), {world} rank(s) on "
           f"{device.type}, steps {start}..{last_step} of {total_steps} ({per_epoch} per epoch of <= {cfg.batch_size} "
           f"sequences), forking tags {data.fork_tag(fork_names[0], cfg.fork_style)!r}.."
           f"{data.fork_tag(fork_names[-1], cfg.fork_style)!r} "
           f"= ids {fork_ids[0]}..{fork_ids[-1]}, "
           f"{cfg.layout} layout, attention {fsdp.attention_backend(cfg.layout, device)}"
           + (" with a dense boolean tree mask" if cfg.layout == "concat" and device.type != "cuda" else ""))
    skipped = 0

    def checkpoint(step):  # resumable: the model, AdamW and the matching statistics (--keep_checkpoints kept)
        return fsdp.save_checkpoint(model, optimizer, step, {"matching": stats.to_json()}, cfg.out_dir, rank,
                                    keep=cfg.keep_checkpoints)

    for step in range(start, last_step):
        t0 = time.time()
        epoch, batch = plan[step]
        # questions over ranks by the tokens of their matching forwards (prompt + tag + first K per trace)
        mine = [batch[i] for i in batching.balance([sum(len(encoded[q]["prompt_ids"]) + 1 + min(cfg.match_tokens, len(t))
                                                    for t in encoded[q]["trace_ids"]) for q in batch], world)[rank]]
        mine_encoded = [encoded[q] for q in mine]

        # Eq. 3-4: the matching pass, the same number of no-grad forwards on every rank
        n_forwards = None if cfg.matching == "sft" else \
            all_max(match.num_cost_batches(mine_encoded, cfg.num_forks, cfg.match_batch, cfg.layout), device)
        try:
            matched, bad = match.match_questions(model, mine_encoded, fork_ids, cfg.matching, cfg.match_tokens,
                                                 cfg.match_batch, pad_id, device,
                                                 [np.random.default_rng([cfg.seed, step, q]) for q in mine],
                                                 n_forwards, cfg.layout), []
        except match.NonFiniteCost as e:  # diverged weights: every rank learns of it below
            matched, bad = [None] * len(mine), [mine[k] for k in e.questions]
        gathered = [None] * world  # every rank sees every question's matching
        dist.all_gather_object(gathered, (dict(zip(mine, matched)), bad))
        all_matched = {q: m for part, _ in gathered for q, m in part.items()}
        nonfinite = sorted(q for _, part in gathered for q in part)

        # Eq. 5: the training pass over the matched pairs
        lr = lr_at(step, total_steps, cfg.lr, cfg.warmup)
        loss = grad_norm = pad_fraction = float("nan")
        global_input = 0
        if not nonfinite:
            for group in optimizer.param_groups:
                group["lr"] = lr
            # every rank holds every matching: the step's rows go over the ranks by tokens, so a rank with
            # one question of long traces does not hold the others up (a question's rows may be split)
            rows = training_rows([encoded[q] for q in batch], [all_matched[q] for q in batch], fork_ids, cfg.layout)
            rows = [rows[i] for i in batching.balance([len(r[0]) for r in rows], world)[rank]]
            loss, _, global_input, pad_fraction = training_pass(model, rows, cfg.micro_batch, cfg.layout, pad_id, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if nonfinite or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = f"non-finite matching costs for questions {nonfinite}" if nonfinite else \
                f"non-finite loss {loss} / grad norm {grad_norm} on questions {batch}"
            if not cfg.skip_nonfinite:
                names = [questions[i]["prompt"][:40] for i in nonfinite or batch]
                sys.exit(f"error: step {step}: {what} (data order of epoch {epoch}): {names}; "
                         "--skip_nonfinite true skips such batches")
            skipped += 1
            print0(f"step {step}: {what}: batch skipped ({skipped} so far)")
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # statistics and logs: rank 0 writes every question's matching in batch order
        for q in batch if not nonfinite else []:
            m = all_matched[q]
            stats.update(epoch, m.optimal_forks, m.optimal_traces, questions[q]["sources"], m.gap)
        stats.end_step(epoch)
        gaps = [all_matched[q].gap for q in batch if all_matched[q] is not None and all_matched[q].gap is not None]
        dt = time.time() - t0
        record = {"step": step, "epoch": epoch, "questions": len(batch),
                  "sequences": sum(len(all_matched[q].forks) for q in batch if all_matched[q] is not None),
                  "loss": loss, "lr": lr, "grad_norm": grad_norm, "gap": float(np.mean(gaps)) if gaps else None,
                  "tokens_per_s": global_input / dt, "pad_fraction": pad_fraction, "skipped": skipped, "time_s": dt}
        if rank == 0:
            append_jsonl(metrics_path, record)  # non-finite values are logged as null
            write_json(matching_path, stats.to_json())
            print(f"step {step + 1:5d}/{last_step} | loss {loss:.4f} | lr {lr:.2e} | gap "
                  f"{record['gap'] if record['gap'] is not None else float('nan'):.4f} | "
                  f"{record['tokens_per_s']:7.0f} tok/s | pad {pad_fraction:.2f}", flush=True)
        if all_max(bool(STOP), device) and step + 1 < last_step:  # preempted: every rank stops here
            path = checkpoint(step + 1)
            print0(f"stopped by a signal after step {step + 1}: checkpoint {path}; the same command resumes")
            sys.exit(128 + (STOP[0] if STOP else signal.SIGTERM))
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < last_step:
            checkpoint(step + 1)

    checkpoint(last_step)
    fsdp.save_final(model, tokenizer, hf_config, final, rank, {"fork_style": cfg.fork_style, "num_forks": cfg.num_forks})
    print0(f"done: {last_step} steps, {skipped} skipped. Outputs in {cfg.out_dir}/: metrics.jsonl "
           f"(one line per step), matching.json (configuration counts per epoch), checkpoints/, "
           f"final/ (Hugging Face model + tokenizer with {fork_names[0]}..{fork_names[-1]})")


if __name__ == "__main__":
    main(parse_config())
