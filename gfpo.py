"""Global Forking Policy Optimization (GFPO, arXiv 2510.05132 v3): after SSFT, reinforcement learning
on the global forking token only, so that the model picks the reasoning mode per question.

The policy is the model's distribution over its N tags right after the generation prompt,
renormalised over the tags (policy.py): pi(i | x) = softmax_i log p(g_i | x). Each step takes B
distinct questions with gold answers and, on every rank alike,
  1. rollouts (no grad): G tags g_1..g_G drawn from pi (at --fork_temperature), one response per
     tag (T = 0.7, top_p 0.95), all of a rank's B/ranks x G responses decoded together
     (decoding.generate_many), graded by grader.py: r_k = 1 if correct else 0;
  2. group-relative advantages, as GRPO: A_k = (r_k - mean r) / (std r + eps) over the question's G
     samples (--advantage mean: r_k - mean r);
  3. one optimiser step (on-policy) on

       L(theta) = 1/B sum_x [ -1/G sum_k A_k log pi_T(g_k | x)  +  beta KL(pi(.|x) || pi_start(.|x)) ]

     whose forward runs over the prompts and the tags only, never the responses: the gradient
     reaches the model through the tag logits alone. KL is exact over the N tags; pi_start is the
     starting model's policy, computed once and kept in --out_dir/pi_start.json.

Where this differs from GRPO as usually run: the action is one tag, not a response, so there is no
ratio or clip (one step per rollout batch, exactly on-policy) and no per-token KL; a response cut at
--max_new_tokens gets --truncated_reward; every forward runs in eval mode (no dropout); a response
never samples a forking token. --trainable tag_rows trains only the tags' N output rows (untied from
the input embeddings first): the responses, and so each tag's rewards, cannot change.

    python train.py && python gfpo.py --model out/ssft/final    # toy: 40 steps of 16 x 8, CPU
    python infer.py --model out/gfpo/final --data toy --fork auto --samples 16 --max_new_tokens 64
    python gfpo.py --model out/ssft-32b/final --plan 8x141       # rollout memory and hours, exit 0 fits
    torchrun --standalone --nproc_per_node 8 gfpo.py --model out/ssft-32b/final \\
        --data dapo-math-17k.parquet --out_dir out/gfpo-32b          # 10 steps of 32 questions x 8

Rerunning the same command on an existing --out_dir resumes from its last complete checkpoint.
"""
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import policy
import toy
from plumbing import decoding, evalfiles, figures, fsdp, gfporun, grader, memory, runs
from plumbing.files import DataError, read_json
from plumbing.flags import check, parse_flags
from plumbing.ranks import all_sum, close_distributed, init_distributed, print0, stage_run


@dataclass
class Config:
    model: str = "out/ssft/final"  # an SSFT final/ directory: its ssft.json gives the tag style and N
    data: str = "toy"  # question file (infer.py's layouts, DAPO-Math-17k's) as JSONL or Parquet, or toy
    out_dir: str = "out/gfpo"  # config.json, metrics.jsonl, pi_start.json, tag_choice.png, checkpoints/, final/
    instruction: str = "auto"  # the prompt template, as infer.py's --instruction
    steps: int = 10  # optimiser steps, one per rollout batch (the released SSFT-32B-GFPO: 10) (toy: 40)
    batch_size: int = 32  # B, distinct questions per step over all ranks (a multiple of the ranks) (toy: 16)
    group_size: int = 8  # G, tags sampled (and responses generated) per question, >= 2
    lr: float = 1e-6  # Adam learning rate, constant (toy: 1e-5; on the toy 3e-5 already damaged the responses)
    beta: float = 0.0  # weight of KL(pi || pi_start) over the N tags
    advantage: str = "std"  # std: (r - mean) / (std + eps), GRPO's; mean: r - mean
    eps: float = 1e-4  # added to the group's standard deviation
    fork_temperature: float = 1.0  # tags are drawn from softmax(log p(g_i | x) / T); kept in final/ssft.json
    temperature: float = 0.7  # response sampling temperature (the paper's)
    top_p: float = 0.95  # response nucleus threshold (the paper's)
    max_new_tokens: int = 32768  # tokens per response (toy: 64)
    truncated_reward: str = "grade"  # a response cut at max_new_tokens: grade (as evaluation does) | zero
    trainable: str = "all"  # all: every weight; tag_rows: only the tags' output rows (special tags)
    gen_batch: int = 0  # responses decoded together (0: on CUDA as many as the memory plan fits, else all)
    keep_gathered: str = "auto"  # keep every layer gathered while decoding: auto (the memory plan) | yes | no
    micro_batch: int = 4  # questions per policy forward in the update (toy: 16)
    weight_decay: float = 0.0  # AdamW weight decay (betas 0.9, 0.95); 0 with tag_rows
    grad_clip: float = 1.0  # clip the global gradient norm to this
    seed: int = 0  # question order, tag draws and responses all derive from it
    save_every: int = 5  # a resumable checkpoint every this many steps (0: only at the end)
    eval_every: int = 0  # held-out own-tag Pass@1 every this many steps and at the end (0: never) (toy: 10)
    eval_data: str = ""  # held-out questions ('': the toy's held-out ones with --data toy, else none)
    eval_questions: int = 100  # held-out questions used (the first ones)
    eval_samples: int = 4  # responses per held-out question, all with the model's own (greedy) tag
    activation_checkpointing: bool = True  # recompute decoder layers in backward (toy: off)
    cpu_offload: bool = False  # keep sharded params, grads and AdamW states in CPU memory (FSDP2)
    toy_questions: int = 2000  # --data toy: training questions of toy.py (never the held-out ones)
    plan: str = ""  # GPUSxGiB, e.g. 8x141: print the rollout memory plan for --model and exit (0 fits, 3 not)
    trust_remote_code: bool = False  # let transformers run code shipped with the model
    report_to: str = ""  # tensorboard: also log every metric to <out_dir>/tensorboard (needs tensorboard)


RULES = {"steps": ">= 1", "batch_size": ">= 1", "max_new_tokens": ">= 1", "micro_batch": ">= 1",
         "toy_questions": ">= 1", "group_size": ">= 2", "advantage": ("std", "mean"), "lr": "> 0",
         "fork_temperature": "> 0", "temperature": ">= 0", "top_p": "(0, 1]", "beta": ">= 0", "eps": ">= 0",
         "weight_decay": ">= 0", "gen_batch": ">= 0", "save_every": ">= 0", "grad_clip": "> 0",
         "truncated_reward": ("grade", "zero"), "trainable": ("all", "tag_rows"), "eval_every": ">= 0",
         "keep_gathered": ("auto", "yes", "no"), "eval_questions": ">= 1", "eval_samples": ">= 1"}
RESUME_FREE = {"save_every", "out_dir", "report_to", "plan"}  # may change on resume


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**{**(toy.GFPO_DEFAULTS if given.get("data", Config.data) == "toy" else {}), **given})
    decay = "--trainable tag_rows needs --weight_decay 0 (decay would move every row)" \
        if cfg.trainable == "tag_rows" and cfg.weight_decay else None
    check(parser, cfg, RULES, [runs.check_reporter(cfg.report_to), memory.plan_problem(cfg.plan), decay])
    return cfg


# ----------------------------------------------------------------------------- the objective

def group_advantages(rewards, scale=True, eps=1e-4):
    """rewards: [B, G] -> advantages [B, G], relative to the question's group (GRPO): r - mean r,
    divided by (std r + eps) when `scale` (the unbiased std, as TRL's GRPOTrainer). A group whose
    rewards are all equal gets A = 0: it carries no signal."""
    centred, std = rewards - rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), 0.0) if scale else centred  # 0, not 0/0, with --eps 0


def gfpo_loss(tag_logits, tags, advantages, logpi_start, beta, temperature, num_questions):
    """The GFPO loss of some questions, their share of the global mean over `num_questions`.
    tag_logits: [B, N] (policy.TagPolicy, with grad); tags: [B, G] the sampled tag indices;
    advantages: [B, G]; logpi_start: [B, N] log pi_start. Responses do not enter."""
    logpi_sampled = policy.log_policy(tag_logits, temperature)  # the policy the tags were drawn from
    pg = -(advantages * logpi_sampled.gather(1, tags)).mean(1)  # [B]
    kl = policy.kl_to_start(policy.log_policy(tag_logits), logpi_start)  # [B]
    return (pg + beta * kl).sum() / num_questions


def policy_update(model, prompts, tags, advantages, logpi_start, beta, temperature, num_questions, micro_batch):
    """The backward of this rank's share of the GFPO loss, `micro_batch` questions per forward of the
    policy module (policy.TagPolicy, in eval mode): the responses are never computed. tags,
    advantages: [B, G]; logpi_start: [B, N]. Gradients accumulate; returns this rank's loss share."""
    world, loss_sum = dist.get_world_size() if dist.is_initialized() else 1, 0.0
    for s in range(0, len(prompts), micro_batch):
        logits = model(prompts[s:s + micro_batch])["tag_logits"]
        part = [t[s:s + micro_batch].to(logits.device) for t in (tags, advantages, logpi_start)]
        loss = gfpo_loss(logits, *part, beta, temperature, num_questions)
        (loss * world).backward()  # x world: FSDP averages gradients over ranks; we want the global mean
        loss_sum += loss.item()
    return loss_sum


# ----------------------------------------------------------------------------- rollouts

def reward(text, finished, gold, truncated_reward):
    """1.0 if the response's answer is right, else 0.0. A response cut at --max_new_tokens
    (finished False): with "grade" the grader's rule for cut responses, as infer.py and score.py
    grade it (an answer only after a closed </think>: one boxed mid-thought is no answer); with
    "zero" always 0."""
    if not finished and truncated_reward == "zero":
        return 0.0
    return float(grader.grade(text, gold["gold"], gold["kind"], finished=finished, question=gold["prompt"])[1])


def respond(model, prompts, golds, starts, generator, cfg, ctx):
    """One graded response per entry of starts [B][k] (forced tag token ids), all B x k decoded
    together, ctx["rows"] at a time, with the weights gathered for decoding (gfporun.decoding_weights).
    Returns (rewards [B, k], tokens [B, k], truncated [B, k])."""
    with gfporun.decoding_weights(model, ctx["keep_gathered"], ctx["device"], ctx["pad_id"]) as lm:
        out = decoding.generate_many(lm, prompts, starts, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                     ctx["stop_ids"], generator, ctx["rows"], ctx["banned"], ctx["pad_id"])
    rewards = [[reward(ctx["tokenizer"].decode(ids), done, gold, cfg.truncated_reward) for ids, done in row]
               for row, gold in zip(out, golds)]
    return (torch.tensor(rewards), torch.tensor([[len(ids) for ids, _ in row] for row in out]),
            torch.tensor([[not done for _, done in row] for row in out]))


@torch.no_grad()
def rollouts(model, prompts, golds, tag_generators, generator, cfg, ctx):
    """This rank's rollout batch: for each prompt, G tags drawn from pi_T (on the CPU, one generator
    per question) and one response per tag (`generator`: on the decoding device). Returns {"logpi":
    [B, N] (T = 1), "mass": [B], "tags", "rewards", "tokens", "truncated": [B, G]}."""
    scored = policy.tag_logits(model, prompts, cfg.micro_batch)
    logpi_t = policy.log_policy(scored["tag_logits"], cfg.fork_temperature)
    tags = torch.cat([policy.choose_tags(logpi_t[q:q + 1], cfg.group_size, False, g)
                      for q, g in enumerate(tag_generators)])
    starts = [[ctx["fork_ids"][t] for t in row] for row in tags.tolist()]
    rewards, tokens, truncated = respond(model, prompts, golds, starts, generator, cfg, ctx)
    return {"logpi": policy.log_policy(scored["tag_logits"]), "mass": scored["log_mass"].exp(), "tags": tags,
            "rewards": rewards, "tokens": tokens, "truncated": truncated}


@torch.no_grad()
def held_out_pass(model, prompts, golds, generator, cfg, ctx, rank, world):
    """Pass@1 on held-out questions with the model's own tag (the argmax of pi, as infer.py --fork
    auto): --eval_samples responses each. Questions strided over ranks, every rank the same count."""
    per_rank = math.ceil(len(prompts) / world)
    mine = list(range(rank, len(prompts), world))
    counted = len(mine)
    mine += [0] * (per_rank - counted)  # equal forwards; the repeats are not counted
    own = policy.tag_logits(model, [prompts[i] for i in mine], cfg.micro_batch)["tag_logits"].argmax(-1)
    starts = [[ctx["fork_ids"][t]] * cfg.eval_samples for t in own.tolist()]
    rewards, _, _ = respond(model, [prompts[i] for i in mine], [golds[i] for i in mine], starts, generator, cfg, ctx)
    right, total = all_sum([rewards[:counted].sum().item(), counted * cfg.eval_samples], ctx["device"])
    return right / total


# ----------------------------------------------------------------------------- main

def load_questions(path, cfg, held_out=False):
    """[{"id", "prompt", "gold", "kind"}] of a question file (evalfiles.load_problems: evaluation and
    training layouts, DAPO-Math-17k), or of the toy: its training questions, or its held-out ones."""
    if path == "toy":
        rows = toy.held_out_questions(cfg.eval_questions) if held_out else toy.make_questions(cfg.toy_questions,
                                                                                                cfg.seed)
        return [{"id": i, "prompt": q["prompt"], "gold": q["answer"], "kind": "math"} for i, q in enumerate(rows)]
    return evalfiles.load_problems(path, cfg.instruction, cfg.eval_questions if held_out else 0)


def prepare(cfg):
    """Every check that needs no model, on every rank alike: the SSFT model's ssft.json and tags, the
    questions, --out_dir. Returns a dict: questions, prompts, held-out ones, tokenizer, fork ids, forks."""
    from transformers import AutoTokenizer
    ssft_json = os.path.join(cfg.model, "ssft.json")
    if not os.path.isfile(ssft_json):
        raise DataError(f"--model {cfg.model}: no ssft.json (GFPO starts from an SSFT final/ directory)")
    forks = read_json(ssft_json)
    if not isinstance(forks, dict) or forks.get("fork_style") not in data.FORK_STYLES \
            or not isinstance(forks.get("num_forks"), int) or forks["num_forks"] < 2:
        raise DataError(f"{ssft_json}: need fork_style (special or text) and num_forks >= 2, got {forks}")
    if cfg.trainable == "tag_rows" and forks["fork_style"] != "special":
        raise DataError(f"--trainable tag_rows needs special tags ({ssft_json}: text tags are ordinary tokens "
                        "that responses use too)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"--model {cfg.model}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if forks["fork_style"] == "special" and data.count_fork_tokens(tokenizer) < forks["num_forks"]:
        raise DataError(f"--model {cfg.model}: its tokenizer holds {data.count_fork_tokens(tokenizer)} forking "
                        f"tokens, ssft.json says {forks['num_forks']}")
    fork_ids = data.fork_ids(tokenizer, forks["num_forks"], forks["fork_style"])
    questions = load_questions(cfg.data, cfg)
    eval_data = cfg.eval_data or ("toy" if cfg.data == "toy" and cfg.eval_every else "")
    held_out = load_questions(eval_data, cfg, held_out=True) if eval_data and cfg.eval_every else []
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world or cfg.batch_size > len(questions):
        raise DataError(f"--batch_size {cfg.batch_size} must be a multiple of the {world} ranks and at most "
                        f"the {len(questions)} questions of --data {cfg.data}")
    runs.check_out_dir(cfg.out_dir, cfg, RESUME_FREE)
    encode = [data.encode_prompt(tokenizer, q["prompt"]) for q in questions + held_out]
    return {"questions": questions, "prompts": encode[:len(questions)], "held_out": held_out,
            "held_out_prompts": encode[len(questions):], "tokenizer": tokenizer, "fork_ids": fork_ids, "forks": forks}


def main(cfg):
    if cfg.plan:  # the rollout memory plan from config.json alone: nothing loads, nothing is written
        gpus, gib = memory.parse_gpus(cfg.plan)
        shape = memory.read_shape(cfg.model)
        plan = memory.gfpo_plan(shape, gpus, gib, cfg.batch_size // gpus * cfg.group_size,
                                memory.PROMPT_TOKENS + cfg.max_new_tokens, cfg.cpu_offload)
        print("\n".join(memory.format_gfpo_plan(plan, gpus, gib)))
        sys.exit(0 if plan["fits"] else 3)
    try:
        prepared = prepare(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    rank, world, device = init_distributed()
    try:
        with stage_run(cfg.out_dir, rank):
            train(cfg, prepared, rank, world, device)
    finally:
        close_distributed()


def decoding_setup(cfg, run, model, world, device):
    """What decoding needs (gfpo.respond's ctx): on CUDA the memory plan decides --gen_batch 0 and
    --keep_gathered auto (SystemExit when no response fits); on the CPU all rows at once, gathered."""
    rows, keep = cfg.gen_batch, cfg.keep_gathered == "yes"
    if device.type == "cuda" and (not rows or cfg.keep_gathered == "auto"):
        gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
        longest = max(map(len, run["prompts"] + run["held_out_prompts"]))
        plan = memory.gfpo_plan(memory.read_shape(model.lm.config.to_dict()), world, gib,
                                cfg.batch_size // world * cfg.group_size, longest + cfg.max_new_tokens, cfg.cpu_offload)
        print0("\n".join(memory.format_gfpo_plan(plan, world, gib)))
        if not plan["fits"]:
            sys.exit(f"error: not one response of {cfg.max_new_tokens} tokens fits beside the weights: "
                     "--cpu_offload true, a smaller --max_new_tokens or more GPUs")
        keep = plan["keep_gathered"] if cfg.keep_gathered == "auto" else keep
        rows = rows or plan["ways"]["gathered" if keep else "sharded"]["at_once"]
    elif cfg.keep_gathered == "auto":
        keep = True
    tokenizer = run["tokenizer"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    special = run["forks"]["fork_style"] == "special"
    return {"fork_ids": run["fork_ids"], "stop_ids": decoding.stop_ids(tokenizer, model.lm), "tokenizer": tokenizer,
            "banned": [t[0] for t in run["fork_ids"]] if special else [], "pad_id": pad_id, "device": device,
            "rows": rows, "keep_gathered": keep}


def train(cfg, run, rank, world, device):
    """GFPO from the SSFT model to final/, on every rank."""
    questions, prompts, fork_ids, forks = run["questions"], run["prompts"], run["fork_ids"], run["forks"]
    plan = gfporun.step_questions(len(questions), cfg.batch_size, cfg.steps, cfg.seed)
    if runs.is_complete(cfg.out_dir, cfg.steps):
        return
    tokenizer = run["tokenizer"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tag_rows = cfg.trainable == "tag_rows"
    model, hf_config = fsdp.load_model(
        cfg.model, rank, device, lambda lm: policy.TagPolicy(lm, fork_ids, pad_id), "batch", cfg.seed,
        cfg.activation_checkpointing, cfg.cpu_offload, cfg.trust_remote_code, untie=tag_rows,
        trainable=(lambda name: name == "lm_head.weight") if tag_rows else None)
    gfporun.eval_mode(model.lm, cfg.activation_checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    run_questions = sorted({q for batch in plan for q in batch})  # pi_start is needed for these only
    try:
        start, _ = fsdp.resume(model, optimizer, cfg.out_dir, rank, device, lambda state: None)
        logpi_start = gfporun.load_or_make_start(
            cfg.out_dir, start > 0, run_questions, lambda: gfporun.start_policy(
                lambda ps: policy.log_policy(policy.tag_logits(model, ps, cfg.micro_batch)["tag_logits"]),
                [prompts[q] for q in run_questions], rank, world), rank)
    except DataError as e:
        sys.exit(f"error: {e}")
    start_row = {q: i for i, q in enumerate(run_questions)}
    ctx = decoding_setup(cfg, run, model, world, device)
    log = runs.Log(cfg.out_dir, cfg, start, rank, cfg.report_to)
    names = data.fork_tokens(forks["num_forks"])
    print0(json.dumps(dataclasses.asdict(cfg)))
    print0(f"{len(questions)} questions, {world} rank(s) on {device.type}, steps {start}..{cfg.steps} of "
           f"{cfg.batch_size} questions x {cfg.group_size} tags, policy over {names[0]}..{names[-1]} "
           f"({forks['fork_style']} style), training {cfg.trainable}, {ctx['rows'] or 'all'} responses decoded "
           f"together, layers {'kept gathered' if ctx['keep_gathered'] else 'gathered per forward'}")

    def checkpoint(step):
        return fsdp.save_checkpoint(model, optimizer, step, {}, cfg.out_dir, rank)

    for step in range(start, cfg.steps):
        t0 = time.time()
        mine = plan[step][rank::world]
        tag_generators = [torch.Generator().manual_seed(gfporun.seed_of(cfg.seed, step, q)) for q in mine]
        generator = torch.Generator(device).manual_seed(gfporun.seed_of(cfg.seed, step, rank, world))
        # 1. rollouts: G tags from pi, one graded response each (no grad)
        out = rollouts(model, [prompts[q] for q in mine], [questions[q] for q in mine], tag_generators,
                       generator, cfg, ctx)
        # 2. group-relative advantages
        advantages = group_advantages(out["rewards"], cfg.advantage == "std", cfg.eps)
        # 3. the update: a forward over prompts + tags, never the responses
        start_rows = logpi_start[[start_row[q] for q in mine]]
        loss_sum = policy_update(model, [prompts[q] for q in mine], out["tags"], advantages, start_rows, cfg.beta,
                                 cfg.fork_temperature, cfg.batch_size, cfg.micro_batch)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            sys.exit(f"error: step {step}: non-finite loss {loss_sum} / grad norm {grad_norm}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = {"grad_norm": grad_norm, "lr": cfg.lr}
        if run["held_out"] and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            eval_generator = torch.Generator(device).manual_seed(gfporun.seed_of(cfg.seed, step, rank, world, 1))
            stats["held_out_pass@1"] = held_out_pass(model, run["held_out_prompts"], run["held_out"],
                                                     eval_generator, cfg, ctx, rank, world)

        # logs: every rank's questions gathered on rank 0
        parts = [None] * world
        dist.all_gather_object(parts, {k: out[k].tolist() for k in ("logpi", "mass", "tags", "rewards", "tokens",
                                                                    "truncated")}
                               | {"start": start_rows.tolist(), "loss": loss_sum})
        record = gfporun.step_record(step, parts, names, {"loss": sum(p["loss"] for p in parts), **stats,
                                                          "time_s": time.time() - t0})
        log.write(record)
        print0(gfporun.step_line(record, cfg.steps, log.time_left(step, cfg.steps)))
        runs.stop_or_save(step, cfg.steps, cfg.save_every, checkpoint, device)

    checkpoint(cfg.steps)
    fsdp.save_final(model, tokenizer, hf_config, os.path.join(cfg.out_dir, "final"), rank,
                    {**forks, "fork_temperature": cfg.fork_temperature})  # infer.py --fork auto samples at it
    log.close()
    if rank == 0:
        figures.draw_tag_choice(log.records(), names, os.path.join(cfg.out_dir, "tag_choice.png"))
    print0(f"done: {cfg.steps} steps. Outputs in {cfg.out_dir}/: metrics.jsonl (one line per step), "
           f"pi_start.json, tag_choice.png, checkpoints/, final/ (Hugging Face model + tokenizer, ssft.json)")


if __name__ == "__main__":
    main(parse_config())
