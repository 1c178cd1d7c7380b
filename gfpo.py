"""Global Forking Policy Optimization (GFPO, arXiv 2510.05132 v3): after SSFT, reinforcement
learning on the global forking token only, so that the model picks the reasoning mode per question.

The policy is pi(i | x) = softmax_i log p(g_i | x), the model's distribution over its N tags right
after the generation prompt, renormalised over the tags (policy.py). Each step takes B distinct
questions with gold answers and, on every rank alike,
  1. rollouts (no grad): G tags g_1..g_G drawn from pi (at --fork_temperature), one response per
     tag (T = 0.7, top_p 0.95), each graded: r_k = 1 if correct else 0;
  2. group-relative advantages, as GRPO: A_k = (r_k - mean r) / (std r + eps) over the question's G
     samples (--advantage mean: r_k - mean r);
  3. one optimiser step (on-policy) on

      L(theta) = 1/B sum_x [ -1/G sum_k A_k log pi_T(g_k | x) + beta KL(pi(.|x) || pi_start(.|x)) ]

     whose forward runs over the prompts only, never the responses: the gradient reaches the model
     through the tag logits alone. KL is exact over the N tags; pi_start is the start model's.

Left out of GRPO as usually run: the action is one tag, not a response, so there is no ratio or
clip (one step per rollout batch, exactly on-policy) and no per-token KL. Added: a response cut at
--max_new_tokens gets --truncated_reward; every forward runs in eval mode; no response samples a
forking token; --trainable tag_rows trains the tags' output rows alone: responses cannot change.

    python train.py && python gfpo.py --model out/ssft/final    # toy: 40 steps of 16 x 8, CPU
    python infer.py --model out/gfpo/final --data toy --fork auto --samples 16 --max_new_tokens 64
    python gfpo.py --model out/ssft-32b/final --plan 8x141       # rollout memory and hours
    torchrun --standalone --nproc_per_node 8 gfpo.py --model out/ssft-32b/final \\
        --data dapo-math-17k.parquet --out_dir out/gfpo-32b          # 10 steps of 32 questions x 8
Rerunning a command on its --out_dir resumes from the last complete checkpoint.
"""
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import policy
import toy
from plumbing import fsdp, gfporun, grader, memory_report, runs
from plumbing.files import model_problem
from plumbing.flags import check, parse_flags
from plumbing.gfpodecoding import decoding_setup, respond
from plumbing.ranks import all_sum, print0


@dataclass
class Config:
    model: str = "out/ssft/final"  # an SSFT final/ directory: its ssft.json gives the tag style, N
    data: str = "toy"  # questions (infer.py's layouts, DAPO-Math-17k's; JSONL or Parquet), or toy
    out_dir: str = "out/gfpo"  # config.json, metrics.jsonl, pi_start.json, checkpoints/, final/
    instruction: str = "auto"  # the prompt template, as infer.py's --instruction
    steps: int = 10  # optimiser steps, one per rollout batch (SSFT-32B-GFPO: 10) (toy: 40)
    batch_size: int = 32  # B, distinct questions per step over all ranks (toy: 16)
    group_size: int = 8  # G, tags sampled (and responses generated) per question, >= 2
    lr: float = 1e-6  # Adam lr, constant (toy: 1e-5, 1e-3 with tag_rows; 3e-5 hurt its responses)
    beta: float = 0.0  # weight of KL(pi || pi_start) over the N tags
    advantage: str = "std"  # std: (r - mean) / (std + eps), GRPO's; mean: r - mean
    eps: float = 1e-4  # added to the group's standard deviation
    fork_temperature: float = 1.0  # tags drawn from softmax(log p(g_i | x) / T); kept in ssft.json
    temperature: float = 0.7  # response sampling temperature (the paper's)
    top_p: float = 0.95  # response nucleus threshold (the paper's)
    max_new_tokens: int = 32768  # tokens per response (toy: 64)
    truncated_reward: str = "grade"  # a response cut at max_new_tokens: grade (as scored) | zero
    trainable: str = "all"  # all: every weight; tag_rows: the tags' output rows alone
    gen_batch: int = 0  # responses decoded at once (0: as the memory plan fits on CUDA, else all)
    keep_gathered: str = "auto"  # every layer gathered while decoding: auto (memory plan), yes, no
    micro_batch: int = 4  # questions per policy forward (toy: 16)
    weight_decay: float = 0.0  # AdamW weight decay (betas 0.9, 0.95); 0 with tag_rows
    grad_clip: float = 1.0  # clip the global gradient norm to this
    seed: int = 0  # question order, tag draws and responses all derive from it
    save_every: int = 5  # a resumable checkpoint every this many steps (0: only at the end)
    eval_every: int = 0  # held-out own-tag Pass@1 every this many steps and at the end (0: never)
    eval_data: str = ""  # held-out questions ('': with --data toy the toy's held-out ones)
    eval_questions: int = 100  # held-out questions used (the first ones)
    eval_samples: int = 4  # responses per held-out question, all with the model's own tag
    activation_checkpointing: bool = True  # recompute decoder layers in backward (toy: off)
    cpu_offload: bool = False  # sharded params, grads and AdamW states in CPU memory (FSDP2)
    toy_questions: int = 2000  # --data toy: training questions of toy.py (never held-out ones)
    plan: str = ""  # GPUSxGiB, e.g. 8x141: print the rollout plan and exit (0 fits, 3 not)
    trust_remote_code: bool = False  # let transformers run code shipped with the model
    report_to: str = ""  # tensorboard: also log every metric to <out_dir>/tensorboard


RULES = {"steps": ">= 1", "batch_size": ">= 1", "max_new_tokens": ">= 1", "micro_batch": ">= 1",
         "toy_questions": ">= 1", "group_size": ">= 2", "advantage": ("std", "mean"), "lr": "> 0",
         "fork_temperature": "> 0", "temperature": ">= 0", "top_p": "(0, 1]", "beta": ">= 0",
         "eps": ">= 0", "weight_decay": ">= 0", "gen_batch": ">= 0", "save_every": ">= 0",
         "grad_clip": "> 0", "truncated_reward": ("grade", "zero"), "eval_every": ">= 0",
         "trainable": ("all", "tag_rows"), "keep_gathered": ("auto", "yes", "no"),
         "eval_questions": ">= 1", "eval_samples": ">= 1"}
RESUME_FREE = {"save_every", "out_dir", "report_to", "plan"}  # may change on resume


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    toy_run = given.get("data", Config.data) == "toy"
    cfg = Config(**{**(toy.gfpo_defaults(given.get("trainable")) if toy_run else {}), **given})
    decay = "--trainable tag_rows needs --weight_decay 0 (decay would move every row)" \
        if cfg.trainable == "tag_rows" and cfg.weight_decay else None
    unused = "--eval_data needs --eval_every >= 1" if cfg.eval_data and not cfg.eval_every else None
    check(parser, cfg, RULES, [model_problem(cfg.model), memory_report.plan_problem(cfg.plan),
                               runs.check_reporter(cfg.report_to), decay, unused])
    return cfg


# ----------------------------------------------------------------------------- the objective

def group_advantages(rewards, scale=True, eps=1e-4):
    """rewards: [B, G] -> advantages [B, G], relative to the question's group (GRPO): r - mean r,
    divided by (std r + eps) when `scale` (the unbiased std, as TRL's GRPOTrainer). A group whose
    rewards are all equal gets A = 0: it carries no signal."""
    centred, std = rewards - rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), 0.0) if scale else centred  # not 0/0


def gfpo_loss(tag_logits, tags, advantages, logpi_start, beta, temperature, num_questions):
    """The GFPO loss of some questions, their share of the global mean over `num_questions`.
    tag_logits: [B, N] (policy.TagPolicy, with grad); tags: [B, G] the sampled tag indices;
    advantages: [B, G]; logpi_start: [B, N] log pi_start. Responses do not enter."""
    logpi_sampled = policy.log_policy(tag_logits, temperature)  # what the tags were drawn from
    pg = -(advantages * logpi_sampled.gather(1, tags)).mean(1)  # [B]
    kl = policy.kl_to_start(policy.log_policy(tag_logits), logpi_start)  # [B]
    return (pg + beta * kl).sum() / num_questions


def policy_update(model, prompts, tags, advantages, logpi_start, beta, temperature, num_questions,
                  micro_batch):
    """The backward of this rank's share of the GFPO loss, `micro_batch` questions per forward of
    the policy module (policy.TagPolicy, eval mode): the responses are never computed. tags,
    advantages: [B, G]; logpi_start: [B, N]. Gradients accumulate; returns this rank's share."""
    world, loss_sum = dist.get_world_size() if dist.is_initialized() else 1, 0.0
    for s in range(0, len(prompts), micro_batch):
        logits = model(prompts[s:s + micro_batch])["tag_logits"]
        part = [t[s:s + micro_batch].to(logits.device) for t in (tags, advantages, logpi_start)]
        loss = gfpo_loss(logits, *part, beta, temperature, num_questions)
        (loss * world).backward()  # x world: FSDP averages over ranks; we want the global mean
        loss_sum += loss.item()
    return loss_sum


# ----------------------------------------------------------------------------- rollouts

def reward(text, finished, gold, truncated_reward):
    """1.0 if the response's answer is right, else 0.0. A response cut at --max_new_tokens (finished
    False): "grade" applies the grader's rule for cut responses, as infer.py and score.py do (an
    answer only after a closed </think>: one boxed mid-thought is no answer); "zero" gives 0."""
    if not finished and truncated_reward == "zero":
        return 0.0
    _, correct = grader.grade(text, gold["gold"], gold["kind"], finished, gold["prompt"])
    return float(correct)


@torch.no_grad()
def rollouts(model, prompts, golds, tag_generators, generator, cfg, ctx):
    """This rank's rollout batch: for each prompt, G tags drawn from pi_T (on the CPU, a generator
    per question) and one response per tag (`generator`: on the decoding device). Returns {"logpi":
    [B, N] (T = 1), "mass": [B], "tags", "rewards", "tokens", "truncated": [B, G]}."""
    scored = policy.tag_logits(model, prompts, cfg.micro_batch)
    logpi_t = policy.log_policy(scored["tag_logits"], cfg.fork_temperature)
    tags = torch.cat([policy.choose_tags(logpi_t[q:q + 1], cfg.group_size, False, g)
                      for q, g in enumerate(tag_generators)])
    starts = [[ctx["fork_ids"][t] for t in row] for row in tags.tolist()]
    rewards, tokens, truncated = respond(model, prompts, golds, starts, generator, cfg, ctx, reward)
    return {"logpi": policy.log_policy(scored["tag_logits"]), "mass": scored["log_mass"].exp(),
            "tags": tags, "rewards": rewards, "tokens": tokens, "truncated": truncated}


@torch.no_grad()
def held_out_pass(model, prompts, golds, generator, cfg, ctx, rank, world):
    """Pass@1 of held-out questions with the model's own tag (the argmax of pi, as infer.py --fork
    auto): --eval_samples responses each, the questions strided over the ranks."""
    mine, counted = gfporun.strided(len(prompts), rank, world)  # equal forwards; pads not counted
    prompts, golds = [prompts[i] for i in mine], [golds[i] for i in mine]
    own = policy.tag_logits(model, prompts, cfg.micro_batch)["tag_logits"].argmax(-1).tolist()
    starts = [[ctx["fork_ids"][t]] * cfg.eval_samples for t in own]
    rewards = respond(model, prompts, golds, starts, generator, cfg, ctx, reward)[0][:counted]
    right, total = all_sum([rewards.sum().item(), rewards.numel()], ctx["device"])
    return right / total


# ----------------------------------------------------------------------------- main

def prepare(cfg):
    """Every check before the model loads (gfporun.prepare), with data.py's and toy.py's readers."""
    return gfporun.prepare(cfg, RESUME_FREE, data.count_fork_tokens, data.encode_prompt,
                           data.fork_ids, toy.training_records, toy.held_out_records)


def train(cfg, run, rank, world, device):
    """GFPO from the SSFT model to final/, on every rank."""
    questions, prompts = run["questions"], run["prompts"]
    plan = gfporun.step_questions(len(questions), cfg.batch_size, cfg.steps, cfg.seed)
    if runs.is_complete(cfg.out_dir, cfg.steps):
        return
    model, hf_config, optimizer, start, logpi_start = gfporun.load(
        cfg, run, plan, policy.TagPolicy, policy.tag_logits, policy.log_policy, rank, world, device)
    ctx = decoding_setup(cfg, run, model, world, device)
    log = runs.Log(cfg.out_dir, cfg, start, rank, cfg.report_to)
    names = data.fork_tokens(run["forks"]["num_forks"])
    gfporun.print_start(cfg, run, ctx, names, start, world, device)

    def checkpoint(step):
        return fsdp.save_checkpoint(model, optimizer, step, {}, cfg.out_dir, rank)

    for step in range(start, cfg.steps):
        t0, mine = time.time(), plan[step][rank::world]
        tag_generators, generator = gfporun.generators(cfg.seed, step, mine, rank, device)
        # 1. rollouts: G tags from pi, one graded response each (no grad)
        out = rollouts(model, [prompts[q] for q in mine], [questions[q] for q in mine],
                       tag_generators, generator, cfg, ctx)
        # 2. group-relative advantages
        advantages = group_advantages(out["rewards"], cfg.advantage == "std", cfg.eps)
        # 3. the update: a forward over the prompts, never the responses
        start_rows = torch.stack([logpi_start[q] for q in mine])
        loss = policy_update(model, [prompts[q] for q in mine], out["tags"], advantages, start_rows,
                             cfg.beta, cfg.fork_temperature, cfg.batch_size, cfg.micro_batch)
        grad_norm = gfporun.clip_grad_norm(optimizer, cfg.grad_clip, loss, step)  # exits on nan
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = {"grad_norm": grad_norm, "lr": cfg.lr}
        if run["held_out"] and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            g = torch.Generator(device).manual_seed(gfporun.seed_of(cfg.seed, step, rank, 1))
            stats["held_out_pass@1"] = held_out_pass(
                model, run["held_out_prompts"], run["held_out"], g, cfg, ctx, rank, world)
        stats["time_s"] = time.time() - t0
        record = gfporun.step_record(step, out, start_rows, loss, names, stats)
        log.write(record)
        print0(gfporun.step_line(record, cfg.steps, log.time_left(step, cfg.steps)))
        runs.stop_or_save(step, cfg.steps, cfg.save_every, checkpoint, device)

    checkpoint(cfg.steps)
    fsdp.save_final(model, run["tokenizer"], hf_config, os.path.join(cfg.out_dir, "final"), rank,
                    run["forks"] | {"fork_temperature": cfg.fork_temperature})  # --fork auto's T
    gfporun.finish(cfg, log, names, rank)  # tag_choice.png, and where the outputs are


def main(cfg):
    if cfg.plan:  # the rollout memory plan from config.json alone: nothing loads or is written
        memory_report.gfpo_plan_exit(cfg)
    runs.stage_main(cfg, prepare, train)  # prepare's checks, then train on every rank


if __name__ == "__main__":
    main(parse_config())
