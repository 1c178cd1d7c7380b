"""Global Forking Policy Optimization (GFPO, arXiv 2510.05132 v3): after SSFT, reinforcement learning
on the global forking token only, so that the model picks the reasoning mode per question.

The policy is the model's distribution over its N tags right after the generation prompt,
renormalised over the tags (policy.py): pi(i | x) = softmax_i log p(g_i | x). Each step takes B
questions with gold answers and, on every rank alike,
  1. rollouts (no grad): G tags g_1..g_G drawn from pi (at --fork_temperature), one response per
     tag by infer.py's shared-prefix decoding (T = 0.7, top_p 0.95), graded by grader.py:
     r_k = 1 if correct else 0 (a response cut at --max_new_tokens is graded as it stands);
  2. group-relative advantages, as GRPO: A_k = (r_k - mean r) / (std r + eps) over the question's G
     samples (--advantage mean: r_k - mean r); a group whose rewards are all equal has A = 0;
  3. one optimiser step (on-policy) on

       L(theta) = 1/B sum_x [ -1/G sum_k A_k log pi_T(g_k | x)  +  beta KL(pi(.|x) || pi_start(.|x)) ]

     whose forward runs over the prompts and the tag tokens only, never the responses: the
     gradient reaches the model through the tag log-probabilities alone. KL is exact over the N
     tags; pi_start is the starting model's policy, computed once for every question the run will
     train on and kept in --out_dir/pi_start.json.

    python train.py && python gfpo.py --model out/ssft/final    # toy: 40 steps of 16 x 8, CPU, ~2 min
    python infer.py --model out/gfpo/final --data toy --fork auto --samples 16 --max_new_tokens 64
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

import numpy as np
import torch
import torch.distributed as dist

import data
import match
import policy
import toy
from plumbing import decoding, evalfiles, figures, fsdp, grader, runs
from plumbing.files import DataError, read_json, write_json
from plumbing.flags import check, parse_flags
from plumbing.ranks import all_max, close_distributed, init_distributed, print0, stage_run


@dataclass
class Config:
    model: str = "out/ssft/final"  # an SSFT final/ directory: its ssft.json gives the tag style and N
    data: str = "toy"  # question file (infer.py's layouts, DAPO-Math-17k's) as JSONL or Parquet, or toy
    out_dir: str = "out/gfpo"  # config.json, metrics.jsonl, pi_start.json, tag_choice.png, checkpoints/, final/
    instruction: str = "auto"  # the prompt template, as infer.py's --instruction
    steps: int = 10  # optimiser steps, one per rollout batch (the released SSFT-32B-GFPO: 10) (toy: 40)
    batch_size: int = 32  # B, questions per step over all ranks (a multiple of the ranks) (toy: 16)
    group_size: int = 8  # G, tags sampled (and responses generated) per question, >= 2
    lr: float = 1e-6  # Adam learning rate, constant (toy: 1e-5; on the toy 3e-5 already damaged the responses)
    beta: float = 0.0  # weight of KL(pi || pi_start) over the N tags
    advantage: str = "std"  # std: (r - mean) / (std + eps), GRPO's; mean: r - mean
    eps: float = 1e-4  # added to the group's standard deviation
    fork_temperature: float = 1.0  # tags are sampled from softmax(log p(g_i | x) / T), and that policy is trained
    temperature: float = 0.7  # response sampling temperature (the paper's)
    top_p: float = 0.95  # response nucleus threshold (the paper's)
    max_new_tokens: int = 32768  # tokens per response (toy: 64)
    gen_batch: int = 0  # responses decoded together (0: a question's G at once), as infer.py's --batch_size
    micro_batch: int = 4  # questions per policy forward (N rows each) in the update (toy: 16)
    weight_decay: float = 0.0  # AdamW weight decay (betas 0.9, 0.95)
    grad_clip: float = 1.0  # clip the global gradient norm to this
    seed: int = 0  # question order, tag draws and responses all derive from it
    save_every: int = 5  # a resumable checkpoint every this many steps (0: only at the end)
    activation_checkpointing: bool = True  # recompute decoder layers in backward (toy: off)
    cpu_offload: bool = False  # keep sharded params, grads and AdamW states in CPU memory (FSDP2)
    toy_questions: int = 2000  # --data toy: training questions of toy.py (never the held-out ones)
    trust_remote_code: bool = False  # let transformers run code shipped with the model
    report_to: str = ""  # tensorboard: also log every metric to <out_dir>/tensorboard (needs tensorboard)


RULES = {"steps": ">= 1", "batch_size": ">= 1", "max_new_tokens": ">= 1", "micro_batch": ">= 1",
         "toy_questions": ">= 1", "group_size": ">= 2", "advantage": ("std", "mean"), "lr": "> 0",
         "fork_temperature": "> 0", "temperature": ">= 0", "top_p": "(0, 1]", "beta": ">= 0", "eps": ">= 0",
         "weight_decay": ">= 0", "gen_batch": ">= 0", "save_every": ">= 0", "grad_clip": "> 0"}
RESUME_FREE = {"save_every", "out_dir", "report_to"}  # may change on resume


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**{**(toy.GFPO_DEFAULTS if given.get("data", Config.data) == "toy" else {}), **given})
    check(parser, cfg, RULES, [runs.check_reporter(cfg.report_to)])
    return cfg


# ----------------------------------------------------------------------------- the objective

def group_advantages(rewards, scale=True, eps=1e-4):
    """rewards: [B, G] -> advantages [B, G], relative to the question's group (GRPO): r - mean r,
    divided by (std r + eps) when `scale` (the unbiased std, as TRL's GRPOTrainer). A group whose
    rewards are all equal gets A = 0: it carries no signal."""
    centred, std = rewards - rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True)
    return torch.where(std > 0, centred / (std + eps), 0.0) if scale else centred  # 0, not 0/0, with --eps 0


def gfpo_loss(tag_logp, tags, advantages, logpi_start, beta, temperature, num_questions):
    """The GFPO loss of some questions, their share of the global mean over `num_questions`.
    tag_logp: [B, N] log p(g_i | x) with grad (policy.tag_log_probs); tags: [B, G] the sampled tag
    indices; advantages: [B, G]; logpi_start: [B, N] log pi_start. Responses do not enter."""
    logpi_sampled = policy.log_policy(tag_logp, temperature)  # the policy the tags were drawn from
    pg = -(advantages * logpi_sampled.gather(1, tags)).mean(1)  # [B]
    kl = policy.kl_to_start(policy.log_policy(tag_logp), logpi_start)  # [B]
    return (pg + beta * kl).sum() / num_questions


def policy_update(model, prompts, tags, advantages, logpi_start, fork_ids, beta, temperature, num_questions,
                  micro_batch, pad_id, device):
    """The backward of this rank's share of the GFPO loss, `micro_batch` questions per forward of
    N rows (prompt + tag_i): the responses are never computed. tags, advantages: [B, G]; logpi_start:
    [B, N]. Gradients accumulate in the model; returns this rank's share of the loss (a float)."""
    model.train()
    world, loss_sum = dist.get_world_size() if dist.is_initialized() else 1, 0.0
    for s in range(0, len(prompts), micro_batch):
        part = slice(s, s + micro_batch)
        tag_logp = policy.tag_log_probs(model, prompts[part], fork_ids, pad_id, device)
        loss = gfpo_loss(tag_logp, tags[part].to(device), advantages[part].to(device), logpi_start[part].to(device),
                         beta, temperature, num_questions)
        (loss * world).backward()  # x world: FSDP averages gradients over ranks; we want the global mean
        loss_sum += loss.item()
    return loss_sum


# ----------------------------------------------------------------------------- rollouts

def step_questions(num_questions, batch_size, steps, seed):
    """[[question index] * batch_size] of every step: seeded permutations of the questions, one
    after another, cut into batches. A pure function, so a resumed run takes the same steps."""
    order, epoch = [], 0
    while len(order) < steps * batch_size:
        order += np.random.default_rng([seed, epoch]).permutation(num_questions).tolist()
        epoch += 1
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def policy_log_probs(model, prompts, fork_ids, micro_batch, pad_id, device):
    """log p(g_i | x): [B, N] of this rank's prompts, micro_batch questions per forward (no grad)."""
    with torch.no_grad():
        return torch.cat([policy.tag_log_probs(model, prompts[s:s + micro_batch], fork_ids, pad_id, device).cpu()
                          for s in range(0, len(prompts), micro_batch)])


@torch.no_grad()
def rollouts(model, prompts, golds, fork_ids, generators, cfg, stop_ids, pad_id, tokenizer, device):
    """This rank's rollout batch: for each prompt, G tags drawn from pi_T and one response per tag.
    Returns {"logpi": [B, N] (T = 1), "tags": [B, G], "rewards": [B, G], "tokens": [B, G],
    "truncated": [B, G]}. Every rank runs the same number of forwards (FSDP's collectives): the
    policy forward in equal micro-batches, and decoding padded by one-token forwards up to the
    longest rank's count."""
    tag_logp = policy_log_probs(model, prompts, fork_ids, cfg.micro_batch, pad_id, device)
    logpi_t = policy.log_policy(tag_logp, cfg.fork_temperature)
    tags = torch.stack([policy.choose_tags(logpi_t[q:q + 1], cfg.group_size, False, g)[0]
                        for q, g in enumerate(generators)])
    lm, sharded = model.lm, hasattr(model, "unshard")
    if sharded:  # the root's parameters (embeddings, norm, head) gathered; each layer gathers its own
        model.unshard()
    lm.eval()
    forwards = [0]
    counter = lm.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    rewards, tokens, truncated = [], [], []
    try:
        for prompt, gold, row_tags, g in zip(prompts, golds, tags.tolist(), generators):
            responses = decoding.generate(lm, prompt, [fork_ids[t] for t in row_tags], cfg.max_new_tokens,
                                       cfg.temperature, cfg.top_p, stop_ids, g, cfg.gen_batch)
            rewards.append([float(grader.grade(tokenizer.decode(ids), gold["gold"], gold["kind"])[1])
                            for ids, _ in responses])
            tokens.append([len(ids) for ids, _ in responses])
            truncated.append([not finished for _, finished in responses])
        for _ in range(all_max(forwards[0], device) - forwards[0]):  # ranks done early keep step
            lm(torch.tensor([[pad_id]], device=device))
    finally:
        counter.remove()
        lm.train()
        if sharded:
            model.reshard()
    return {"logpi": policy.log_policy(tag_logp), "tags": tags, "rewards": torch.tensor(rewards),
            "tokens": torch.tensor(tokens), "truncated": torch.tensor(truncated)}


def start_policy(model, prompts, fork_ids, micro_batch, pad_id, rank, world, device):
    """log pi_start: [Q, N] of the Q prompts (the run's questions), by the model as it is now. Rows
    are strided over the ranks, each rank running the same number of forwards, then gathered."""
    mine = list(range(rank, len(prompts), world))
    per_rank = math.ceil(len(prompts) / world)
    padded = [prompts[i] for i in mine] + [prompts[0]] * (per_rank - len(mine))  # equal forwards
    local = policy.log_policy(policy_log_probs(model, padded, fork_ids, micro_batch, pad_id, device))[:len(mine)]
    parts = [None] * world
    dist.all_gather_object(parts, (mine, local.tolist()))
    out = torch.zeros(len(prompts), len(fork_ids))
    for idx, rows in parts:
        out[idx] = torch.tensor(rows)
    return out


# ----------------------------------------------------------------------------- main

def load_questions(cfg, tokenizer):
    """[{"id", "prompt", "gold", "kind"}] of --data: toy.py's training questions (never a held-out one)
    or a question file (evalfiles.load_problems: evaluation layouts, training layouts, DAPO-Math-17k)."""
    if cfg.data == "toy":
        return [{"id": i, "prompt": q["prompt"], "gold": q["answer"], "kind": "math"}
                for i, q in enumerate(toy.make_questions(cfg.toy_questions, cfg.seed))]
    return evalfiles.load_problems(cfg.data, cfg.instruction)


def prepare(cfg):
    """Every check that needs no model, on every rank alike: the SSFT model's ssft.json and tags, the
    questions, --out_dir. Returns (questions, prompt ids, tokenizer, fork ids, ssft.json's record)."""
    from transformers import AutoTokenizer
    ssft_json = os.path.join(cfg.model, "ssft.json")
    if not os.path.isfile(ssft_json):
        raise DataError(f"--model {cfg.model}: no ssft.json (GFPO starts from an SSFT final/ directory)")
    forks = read_json(ssft_json)
    if not isinstance(forks, dict) or forks.get("fork_style") not in data.FORK_STYLES \
            or not isinstance(forks.get("num_forks"), int) or forks["num_forks"] < 2:
        raise DataError(f"{ssft_json}: need fork_style (special or text) and num_forks >= 2, got {forks}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"--model {cfg.model}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if forks["fork_style"] == "special" and data.count_fork_tokens(tokenizer) < forks["num_forks"]:
        raise DataError(f"--model {cfg.model}: its tokenizer holds {data.count_fork_tokens(tokenizer)} forking "
                        f"tokens, ssft.json says {forks['num_forks']}")
    fork_ids = data.fork_ids(tokenizer, forks["num_forks"], forks["fork_style"])
    questions = load_questions(cfg, tokenizer)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        raise DataError(f"--batch_size {cfg.batch_size} must be a multiple of the {world} ranks")
    runs.check_out_dir(cfg.out_dir, cfg, RESUME_FREE)
    prompts = [data.encode_prompt(tokenizer, q["prompt"]) for q in questions]
    return questions, prompts, tokenizer, fork_ids, forks


def main(cfg):
    try:
        prepared = prepare(cfg)
    except DataError as e:
        sys.exit(f"error: {e}")
    rank, world, device = init_distributed()
    try:
        with stage_run(cfg.out_dir, rank):
            train(cfg, *prepared, rank, world, device)
    finally:
        close_distributed()


def train(cfg, questions, prompts, tokenizer, fork_ids, forks, rank, world, device):
    """GFPO from the SSFT model to final/, on every rank."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = step_questions(len(questions), cfg.batch_size, cfg.steps, cfg.seed)
    if runs.is_complete(cfg.out_dir, cfg.steps):
        return
    model, hf_config = fsdp.load_model(cfg.model, rank, device, match.SequenceNLL, "batch", cfg.seed,
                                       cfg.activation_checkpointing, cfg.cpu_offload, cfg.trust_remote_code)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    run_questions = sorted({q for batch in plan for q in batch})  # pi_start is needed for these only
    start_path = os.path.join(cfg.out_dir, "pi_start.json")
    try:
        start, _ = fsdp.resume(model, optimizer, cfg.out_dir, rank, device, lambda state: None)
        saved = read_json(start_path) if os.path.exists(start_path) else None
        if start and (saved is None or saved.get("questions") != run_questions):
            raise DataError(f"{start_path}: missing or not this run's; a resumed run needs its start policy")
    except DataError as e:
        sys.exit(f"error: {e}")
    if saved and saved.get("questions") == run_questions:  # the start model's, from the first launch
        logpi_start = torch.tensor(saved["log_pi"])
    else:  # before any update: the model is the start model
        logpi_start = start_policy(model, [prompts[q] for q in run_questions], fork_ids, cfg.micro_batch, pad_id,
                                   rank, world, device)
        if rank == 0:
            write_json(start_path, {"questions": run_questions, "log_pi": logpi_start.tolist()})
    start_row = {q: i for i, q in enumerate(run_questions)}
    log = runs.Log(cfg.out_dir, cfg, start, rank, cfg.report_to)
    names = data.fork_tokens(forks["num_forks"])
    stop_ids = decoding.stop_ids(tokenizer, model.lm)
    print0(json.dumps(dataclasses.asdict(cfg)))
    print0(f"{len(questions)} questions, {world} rank(s) on {device.type}, steps {start}..{cfg.steps} of "
           f"{cfg.batch_size} questions x {cfg.group_size} tags, policy over {names[0]}..{names[-1]} "
           f"({forks['fork_style']} style, ids {fork_ids[0]}..{fork_ids[-1]})")

    def checkpoint(step):
        return fsdp.save_checkpoint(model, optimizer, step, {}, cfg.out_dir, rank)

    for step in range(start, cfg.steps):
        t0 = time.time()
        mine = plan[step][rank::world]
        generators = [torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, step, q]).integers(2**62)))
                      for q in mine]
        # 1. rollouts: G tags from pi, one graded response each (no grad)
        out = rollouts(model, [prompts[q] for q in mine], [questions[q] for q in mine], fork_ids, generators, cfg,
                       stop_ids, pad_id, tokenizer, device)
        # 2. group-relative advantages
        advantages = group_advantages(out["rewards"], cfg.advantage == "std", cfg.eps)
        # 3. the update: a forward over prompts + tags, never the responses
        start_rows = logpi_start[[start_row[q] for q in mine]]
        loss_sum = policy_update(model, [prompts[q] for q in mine], out["tags"], advantages, start_rows, fork_ids,
                                 cfg.beta, cfg.fork_temperature, cfg.batch_size, cfg.micro_batch, pad_id, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            sys.exit(f"error: step {step}: non-finite loss {loss_sum} / grad norm {grad_norm}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # logs: every rank's questions gathered on rank 0
        parts = [None] * world
        dist.all_gather_object(parts, {k: out[k].tolist() for k in ("logpi", "tags", "rewards", "tokens", "truncated")}
                               | {"start": start_rows.tolist(), "loss": loss_sum})
        record = step_record(step, parts, names, grad_norm, cfg.lr, time.time() - t0)
        log.write(record)
        print0(f"step {step + 1:4d}/{cfg.steps} | reward {record['reward']:.3f} | choice "
               + " ".join(f"{p:.2f}" for p in record["tag_choice"])
               + f" | entropy {record['entropy']:.3f} | kl {record['kl']:.4f} | no signal "
               f"{record['no_signal']:.2f} | {record['time_s']:.1f} s | {log.time_left(step, cfg.steps)} left")
        runs.stop_or_save(step, cfg.steps, cfg.save_every, checkpoint, device)

    checkpoint(cfg.steps)
    fsdp.save_final(model, tokenizer, hf_config, os.path.join(cfg.out_dir, "final"), rank, forks)  # ssft.json kept
    log.close()
    if rank == 0:
        figures.draw_tag_choice(log.records(), names, os.path.join(cfg.out_dir, "tag_choice.png"))
    print0(f"done: {cfg.steps} steps. Outputs in {cfg.out_dir}/: metrics.jsonl (one line per step), "
           f"pi_start.json, tag_choice.png, checkpoints/, final/ (Hugging Face model + tokenizer, ssft.json)")


def step_record(step, parts, names, grad_norm, lr, seconds):
    """One metrics.jsonl line from every rank's rollouts: mean reward, the tag-choice distribution
    (pi averaged over the questions) and its mean entropy, KL to the start, the share of groups
    with no signal (all rewards equal), each tag's mean reward where sampled."""
    cat = {k: torch.tensor([row for p in parts for row in p[k]]) for k in ("logpi", "tags", "rewards", "start")}
    rewards, tags = cat["rewards"], cat["tags"]
    tag_reward = [rewards[tags == i].mean().item() if (tags == i).any() else None for i in range(len(names))]
    tokens = [t for p in parts for row in p["tokens"] for t in row]
    return {"step": step, "reward": rewards.mean().item(), "tag_choice": cat["logpi"].exp().mean(0).tolist(),
            "sampled": torch.bincount(tags.flatten(), minlength=len(names)).tolist(), "tag_reward": tag_reward,
            "entropy": policy.entropy(cat["logpi"]).mean().item(),
            "kl": policy.kl_to_start(cat["logpi"], cat["start"]).mean().item(),
            "no_signal": (rewards.std(1) == 0).float().mean().item(), "loss": sum(p["loss"] for p in parts),
            "grad_norm": grad_norm, "lr": lr, "mean_tokens": float(np.mean(tokens)),
            "truncated": float(np.mean([t for p in parts for row in p["truncated"] for t in row])), "time_s": seconds}


if __name__ == "__main__":
    main(parse_config())
