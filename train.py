"""Set Supervised Fine-Tuning (Algorithm 1) in a hand-rolled FSDP2 loop.

Each optimiser step takes whole questions holding `batch_size` traces in all (the paper's global
batch of 32 sequences, Appendix A.3.2), shares them over the ranks and runs
  1. the matching pass: the N x M cost matrix of each question (Eq. 4, no grad, eval mode) and its
     matching (Eq. 3: Hungarian, or random / sft for the baselines), match.py;
  2. the training pass: the NTP loss of every matched (forking token, trace) sequence (Eq. 5), in
     micro-batches with gradient accumulation, normalised by the trace tokens over all ranks.

    python train.py                        # toy task, tiny model, CPU, a few minutes
    python train.py --matching random      # the random-matching ablation
    python train.py --layout concat        # Appendix A.5's rows: each prompt computed once
    torchrun --standalone --nproc_per_node 8 train.py --model Qwen/Qwen2.5-32B-Instruct \\
        --data s1k_4mixed.jsonl --out_dir out/ssft-32b  # Appendix A.3.2; 2 nodes: docs/scaling.md

Rerunning the same command on an existing --out_dir resumes from its last complete checkpoint. What
keeps a run alive (resume, signals, the lock, equal forwards on every rank, the memory plan) is in
plumbing/, which a reader of the method may skip.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import data
import match
import toy
from plumbing import concat, datafiles, files, fsdp, memory_report, runs, trainrun
from plumbing.batching import (IGNORE, balance, collate, micro_batches, num_micro_batches,
                               pad_id_of, pad_item)
from plumbing.files import DataError, model_problem
from plumbing.flags import check, parse_flags
from plumbing.ranks import all_max, all_sum, print0


@dataclass
class Config:
    model: str = "toy"  # Hugging Face id or folder, or "toy" (a tiny Qwen2 built in-process)
    data: str = "toy"  # JSONL or Parquet file (layouts: plumbing/datafiles.py), or toy (toy.py)
    out_dir: str = "out/ssft"  # config.json, metrics.jsonl, matching.json, checkpoints/, final/
    num_forks: int = 6  # N, the number of global forking tokens <think1>..<thinkN> (toy: 4)
    fork_style: str = "special"  # special: reserved tokens <thinkI>; text: "<|im_start|><thinkI>\n"
    match_tokens: int = 1000  # K: the cost uses the first K tokens of each trace (Eq. 4) (toy: 4)
    matching: str = "hungarian"  # hungarian (SSFT) | random (ablation) | sft (one token, SFT-mixed)
    layout: str = "batch"  # batch: a row per (token, trace); concat: a row per question (App. A.5)
    epochs: int = 6  # passes over the questions (toy: 4)
    max_steps: int = 0  # stop after this many steps (0: all); lr still decays over all --epochs
    lr: float = 1e-5  # peak learning rate, 5% linear warm-up then cosine to 0 (toy: 3e-3)
    batch_size: int = 32  # sequences (traces) per step over all ranks; whole questions (toy: 64)
    micro_batch: int = 1  # rows a training forward: sequences, or concat questions (toy: 32, 8)
    match_batch: int = 8  # sequences per no-grad forward in the matching pass (toy: 256)
    max_len: int = 32768  # tokens of a row (prompt, tags, traces); traces cut to fit (toy: 256)
    seed: int = 0  # data order, random matchings and new embedding rows all derive from it
    save_every: int = 50  # a resumable checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 2  # complete checkpoints kept, the newest (0: all)
    warmup: float = 0.05  # fraction of the steps spent in linear warm-up
    weight_decay: float = 1e-4  # AdamW weight decay (betas 0.9, 0.95)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    activation_checkpointing: bool = True  # recompute decoder layers in backward (toy: off)
    cpu_offload: bool = False  # keep sharded params, grads and AdamW states in CPU memory (FSDP2)
    skip_nonfinite: bool = False  # skip a batch whose loss is not finite instead of stopping
    toy_questions: int = 2000  # number of training questions of the toy task
    trust_remote_code: bool = False  # let transformers run code shipped with the model
    report_to: str = ""  # tensorboard: also log the metrics to <out_dir>/tensorboard (needs it)
    plan: str = ""  # GPUSxGiB, e.g. 8x80: print the memory plan; exit 0 if it fits, 3 if not
    simulate: bool = False  # with --plan: also measure this step on fake tensors on the CPU


MAX_FORKS = 1024  # --num_forks at most: each is a vocabulary entry and N forwards a trace and step
RULES = {"num_forks": f"[1, {MAX_FORKS}]",
         "match_tokens": ">= 1", "max_len": ">= 2", "matching": ("hungarian", "random", "sft"),
         "layout": ("batch", "concat"), "fork_style": data.FORK_STYLES, "epochs": ">= 1",
         "batch_size": ">= 1", "micro_batch": ">= 1", "match_batch": ">= 1",
         "toy_questions": ">= 1", "lr": "> 0", "grad_clip": "> 0", "warmup": "[0, 1)",
         "weight_decay": ">= 0", "max_steps": ">= 0", "save_every": ">= 0",
         "keep_checkpoints": ">= 0"}
RESUME_FREE = {"max_steps", "save_every", "skip_nonfinite", "out_dir", "keep_checkpoints", "plan",
               "simulate", "report_to"}  # flags a resumed run may change


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    toy_run = given.get("model", Config.model) == "toy"
    cfg = Config(**{**(toy.train_defaults(given.get("layout")) if toy_run else {}), **given})
    simulate_alone = "--simulate needs --plan GPUSxGiB" if cfg.simulate and not cfg.plan else None
    check(parser, cfg, RULES, [model_problem(cfg.model), memory_report.plan_problem(cfg.plan),
                               simulate_alone, runs.check_reporter(cfg.report_to)])
    return cfg


# ----------------------------------------------------------------------------- the schedule

def lr_at(step, total, peak, warmup):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine to 0 (A.3.2)."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def epoch_batches(sizes, batch_size, seed, epoch):
    """The optimiser steps of one epoch, each a list of question indices. sizes[q]: the sequences
    question q trains (M; min(M, N) under a matching). Questions are packed in the epoch's seeded
    order until a step holds batch_size sequences; a question stays whole (its matching needs all
    its traces), so one that would overflow starts the next step. Each trains once per epoch."""
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
    return [(e, batch) for e in range(epochs)
            for batch in epoch_batches(sizes, batch_size, seed, e)]


# ----------------------------------------------------------------------------- one step

def match_pass(model, encoded, batch, fork_ids, cfg, pad_id, step, rank, world, device):
    """Eq. 3-4 for the step's questions `batch` (indices into `encoded`): each rank matches its
    share, balanced by the tokens of its matching forwards, every rank running the same number of
    forwards; then every rank gathers every question's match.Matching. Returns ({question:
    Matching}, [questions whose costs are not finite: diverged weights])."""
    loads = [sum(len(encoded[q]["prompt_ids"]) + len(fork_ids[0]) + min(cfg.match_tokens, len(t))
                 for t in encoded[q]["trace_ids"]) for q in batch]
    mine = [batch[i] for i in balance(loads, world)[rank]]
    questions = [encoded[q] for q in mine]
    forwards = None if cfg.matching == "sft" else all_max(
        match.num_cost_batches(questions, cfg.num_forks, cfg.match_batch, cfg.layout), device)
    rngs = [np.random.default_rng([cfg.seed, step, q]) for q in mine]  # the random matchings
    try:
        matched = match.match_questions(model, questions, fork_ids, cfg.matching, cfg.match_tokens,
                                        cfg.match_batch, pad_id, device, rngs, forwards, cfg.layout)
        bad = []
    except match.NonFiniteCost as e:  # every rank learns of it through the gather
        matched, bad = [None] * len(mine), [mine[k] for k in e.questions]
    gathered = [None] * world
    dist.all_gather_object(gathered, (dict(zip(mine, matched)), bad))
    return ({q: m for part, _ in gathered for q, m in part.items()},
            sorted(q for _, bad in gathered for q in bad))


def training_rows(questions, matched, fork_ids, layout):
    """The rows to train: one per matched (token, trace) pair (batch layout), or one per question
    with its matched branches after a single copy of the prompt (concat layout, Appendix A.5).
    questions: encoded questions; matched: their match.Matching records, in the same order."""
    if layout == "batch":
        return [data.make_sequence(q["prompt_ids"], fork_ids[f], q["trace_ids"][j])
                for q, m in zip(questions, matched) for f, j in zip(m.forks, m.traces)]
    return [concat.make_branches(q["prompt_ids"], [(fork_ids[f], q["trace_ids"][j])
                                                   for f, j in zip(m.forks, m.traces)])
            for q, m in zip(questions, matched)]


def training_pass(model, rows, micro_batch, layout, pad_id, device):
    """Eq. 5 over this rank's rows (training_rows), cut into micro-batches, the same number on every
    rank (PAD-filled). Gradients accumulate; the loss is the sum of token NLLs divided by the number
    of trace tokens over all ranks (not a mean of per-rank means). Returns (loss, global trace
    tokens, global input tokens, padding fraction: the share of computed positions that are PAD)."""
    world = dist.get_world_size()
    n_batches = all_max(num_micro_batches(len(rows), micro_batch), device)
    batches, _ = micro_batches(rows, micro_batch, n_batches, pad_item(pad_id, layout))
    local_tokens = sum(sum(label != IGNORE for label in row[1]) for row in rows)
    computed = sum(len(mb) * max(len(row[0]) for row in mb) for mb in batches)
    global_tokens, global_input, global_computed = all_sum(
        [local_tokens, sum(len(row[0]) for row in rows), computed], device)
    loss_sum = torch.zeros((), device=device)
    model.train()  # model: match.SequenceNLL, (summed NLL [B], count [B]) of each row's labels
    for mb in batches:
        if layout == "batch":
            input_ids, labels, attention_mask = (t.to(device) for t in collate(mb, pad_id))
            nll_sum, _ = model(input_ids, labels, attention_mask)
        else:
            nll_sum, _ = model(**concat.model_inputs(mb, pad_id, device))
        # x world: FSDP averages gradients over ranks, and we want the global sum / global tokens
        (nll_sum.sum() / max(global_tokens, 1) * world).backward()
        loss_sum += nll_sum.sum().detach()
    loss = all_sum([loss_sum.item()], device)[0] / max(global_tokens, 1)
    return loss, global_tokens, global_input, 1 - global_input / global_computed


# ----------------------------------------------------------------------- the loop (Algorithm 1)

def train(cfg, run, rank, world, device):
    """Algorithm 1 from the model's loading to final/, on every rank; run: prepare's dict."""
    questions, encoded, tokenizer, fork_ids = (run[k] for k in ("questions", "encoded",
                                                                "tokenizer", "fork_ids"))
    pad_id = pad_id_of(tokenizer)
    trained = [len(q["traces"]) if cfg.matching == "sft" else  # the sequences a question trains:
               min(len(q["traces"]), cfg.num_forks) for q in questions]  # M, min(M, N) when matched
    plan = schedule(trained, cfg.batch_size, cfg.seed, cfg.epochs)
    last_step = min(len(plan), cfg.max_steps) if cfg.max_steps else len(plan)
    if runs.is_complete(cfg.out_dir, last_step, rank, rebuild={"matching.json": "matching"}):
        return  # nothing to train; a matching.json that no longer reads was rebuilt, exactly
    if device.type == "cuda":  # refuse before loading 65 GB what cannot fit the GPUs we are on
        traces = max(len(q["traces"]) for q in questions)
        memory_report.refuse_unless_fits(memory_plan(cfg, world, traces), world, device)
        if cfg.layout == "concat":
            concat.allow_recompiles(cfg.max_len)
    model, hf_config = load_model(cfg, tokenizer, fork_ids, run["num_trained"], rank, device)
    # fused AdamW on CUDA: the foreach path allocates a temporary the size of the sharded state
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None)
    fork_names = data.fork_tokens(cfg.num_forks)
    start, stats, log = trainrun.resume(model, optimizer, cfg, fork_names, rank, device)
    print0(json.dumps(dataclasses.asdict(cfg)))
    tags = [data.fork_tag(name, cfg.fork_style) for name in fork_names]
    print0(trainrun.run_line(cfg, questions, encoded, plan, start, last_step, tags, fork_ids,
                             world, device, fsdp.attention_backend(cfg.layout, device)))

    def checkpoint(step):  # resumable: the model, AdamW and the matching statistics
        return fsdp.save_checkpoint(model, optimizer, step, {"matching": stats.to_json()},
                                    cfg.out_dir, rank, keep=cfg.keep_checkpoints)

    skipped = 0
    for step in range(start, last_step):
        t0 = time.time()
        epoch, batch = plan[step]
        lr = lr_at(step, len(plan), cfg.lr, cfg.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # Eq. 3-4: the matching pass (no grad); then every rank holds every question's matching
        matched, nonfinite = match_pass(model, encoded, batch, fork_ids, cfg, pad_id, step, rank,
                                        world, device)

        # Eq. 5: the training pass over the matched pairs, the rows shared over the ranks by tokens
        loss = grad_norm = pad = float("nan")
        input_tokens = 0
        if not nonfinite:
            rows = training_rows([encoded[q] for q in batch], [matched[q] for q in batch], fork_ids,
                                 cfg.layout)
            rows = [rows[i] for i in balance([len(r[0]) for r in rows], world)[rank]]
            loss, _, input_tokens, pad = training_pass(model, rows, cfg.micro_batch, cfg.layout,
                                                       pad_id, device)
            grad_norm = fsdp.clip_grad_norm(model.parameters(), cfg.grad_clip)
        if nonfinite or not (math.isfinite(loss) and math.isfinite(grad_norm)):  # diverged
            what = f"non-finite matching costs for questions {nonfinite}" if nonfinite else \
                f"non-finite loss {loss} / grad norm {grad_norm} on questions {batch}"
            names = [questions[i]["prompt"][:40] for i in nonfinite or batch]
            skipped = runs.skip_or_stop(step, f"{what} (data order of epoch {epoch})",
                                        cfg.skip_nonfinite, skipped, names)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # statistics (Figures 7 and 10) and the step's log line
        for q in [] if nonfinite else batch:
            m = matched[q]
            stats.update(epoch, m.optimal_forks, m.optimal_traces, questions[q]["sources"], m.gap)
        stats.end_step(epoch)
        record = trainrun.step_record(step, epoch, batch, matched, loss, lr, grad_norm, pad,
                                      skipped, input_tokens, time.time() - t0)
        log.write(record, files={"matching.json": stats.to_json()})
        print0(trainrun.step_line(record, last_step, log.time_left(step, last_step)))
        runs.stop_or_save(step, last_step, cfg.save_every, checkpoint, device)

    checkpoint(last_step)
    fsdp.save_final(model, tokenizer, hf_config, os.path.join(cfg.out_dir, "final"), rank,
                    {"fork_style": cfg.fork_style, "num_forks": cfg.num_forks})
    log.close()
    print0(f"done: {last_step} steps, {skipped} skipped. Outputs in {cfg.out_dir}/: metrics.jsonl "
           f"(one line per step), matching.json (configuration counts per epoch), checkpoints/, "
           f"final/ (Hugging Face model + tokenizer with {fork_names[0]}..{fork_names[-1]})")


# --------------------------------------------- around the loop: loading, checks, the memory plan

def load_tokenizer(cfg):
    """(tokenizer with the forking tokens, the token ids of each forking tag, the vocabulary size
    before any was added)."""
    tokenizer = toy.make_tokenizer() if cfg.model == "toy" else \
        files.load_tokenizer(cfg.model, cfg.trust_remote_code)  # DataError naming --model
    num_trained = len(tokenizer)
    return tokenizer, data.fork_ids(tokenizer, cfg.num_forks, cfg.fork_style), num_trained


def load_model(cfg, tokenizer, fork_ids, num_trained, rank, device):
    """(SequenceNLL-wrapped FSDP2 model, hf_config) of --model, its new forking-token rows
    initialised (special style; text tags are ordinary tokens, already trained). A tag --model
    already holds (an SSFT model trained on) keeps its trained rows: its id is below num_trained."""
    new = [ids[0] for ids in fork_ids if ids[0] >= num_trained]

    def init_fork_rows(full):
        if cfg.fork_style == "special" and new:
            data.init_fork_rows(full, new, num_trained, cfg.seed)
    source = (lambda: toy.make_model(tokenizer)) if cfg.model == "toy" else cfg.model
    return fsdp.load_model(source, rank, device, match.SequenceNLL, cfg.layout, cfg.seed,
                           cfg.activation_checkpointing, cfg.cpu_offload, cfg.trust_remote_code,
                           edit=init_fork_rows)


def prepare(cfg):
    """Every check that needs no model, on every rank alike: the data, the tokenizer, --out_dir and
    what it holds. Bad input stops here with one message, before a model loads or a file is
    written. Returns {questions, encoded (questions), tokenizer, fork_ids, num_trained (the
    vocabulary before the tags were added)}."""
    if cfg.cpu_offload and not torch.cuda.is_available():
        raise DataError("--cpu_offload offloads from GPU memory and needs CUDA devices")
    questions = toy.make_questions(cfg.toy_questions, cfg.seed) if cfg.data == "toy" else \
        datafiles.load_questions(cfg.data)
    runs.check_out_dir(cfg.out_dir, cfg, RESUME_FREE, cfg.max_steps)  # before the slow tokenising
    tokenizer, fork_ids, num_trained = load_tokenizer(cfg)
    tag_len = max(map(len, fork_ids))
    encoded = [data.encode_question(tokenizer, q, cfg.max_len, tag_len, cfg.layout)
               for q in questions]
    return {"questions": questions, "encoded": encoded, "tokenizer": tokenizer, "fork_ids": fork_ids,
            "num_trained": num_trained}


def model_config(cfg):
    """What --plan reads of --model: its folder or hub id (config.json), or the toy's config."""
    toy_config = cfg.model == "toy" and toy.make_model(toy.make_tokenizer()).config.to_dict()
    return toy_config or cfg.model


def memory_plan(cfg, gpus, traces=4):
    """memory.train_plan of this run's flags on `gpus` GPUs (traces: M, the most of a question)."""
    return memory_report.train_plan(cfg, model_config(cfg), gpus, traces)


def simulated_step(cfg, device=torch.device("cpu"), traces=4):
    """(build, step) of this file's optimiser step, for --plan --simulate (plumbing/simulate.py)."""
    return memory_report.simulated_train_step(cfg, model_config(cfg), device, traces,
                                              match.SequenceNLL, match.match_questions,
                                              training_rows, training_pass)


def main(cfg):
    if cfg.plan:  # the memory table of these flags (measured with --simulate); exit 0 fits, 3 not
        memory_report.train_plan_exit(cfg, memory_plan, simulated_step)
    runs.stage_main(cfg, prepare, train)  # prepare's checks, then train on every rank


if __name__ == "__main__":
    main(parse_config())
