"""What keeps a GFPO run going (gfpo.py), off the method's reading path: the checks before the
model loads and the run's start and end, which questions each step takes, the start policy kept for
the KL and for resuming, and the signals logged per step. Decoding the rollouts under FSDP:
plumbing/gfpodecoding.py.
"""
import dataclasses
import json
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from plumbing import batching, evalfiles, figures, fsdp, runs
from plumbing.files import DataError, load_tokenizer, read_json, write_json
from plumbing.ranks import print0


# ----------------------------------------------------------------------------- the run

def prepare(cfg, resume_free, count_fork_tokens, encode_prompt, fork_ids_of, toy_training,
            toy_held_out):
    """Every check that needs no model, on every rank alike: the SSFT model's ssft.json and tags, the
    questions, --out_dir (settings outside `resume_free` fixed on resume). count_fork_tokens,
    encode_prompt, fork_ids_of: data.py's; toy_training(cfg.toy_questions, cfg.seed) and
    toy_held_out(cfg.eval_questions): toy.py's records of --data toy. Returns the run's dict:
    questions and prompts (training and held-out), tokenizer, fork ids, ssft.json's record.
    DataError names the file or the flag."""
    forks, tokenizer = read_ssft(cfg.model, cfg.trainable, count_fork_tokens, cfg.trust_remote_code)

    def questions_of(path, held_out=False):  # [{"id", "prompt", "gold", "kind", "template"}]
        records = None if path != "toy" else toy_held_out(cfg.eval_questions) if held_out \
            else toy_training(cfg.toy_questions, cfg.seed)
        return evalfiles.load_problems(path, cfg.instruction, cfg.eval_questions * held_out, records)
    questions = questions_of(cfg.data)
    eval_data = cfg.eval_data or ("toy" if cfg.data == "toy" else "")
    held_out = questions_of(eval_data, held_out=True) if eval_data and cfg.eval_every else []
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world or cfg.batch_size > len(questions):
        raise DataError(f"--batch_size {cfg.batch_size} must be a multiple of the {world} ranks "
                        f"and at most the {len(questions)} questions of --data {cfg.data}")
    runs.check_out_dir(cfg.out_dir, cfg, resume_free)
    encode = [encode_prompt(tokenizer, q["prompt"]) for q in questions + held_out]
    return {"questions": questions, "prompts": encode[:len(questions)], "held_out": held_out,
            "held_out_prompts": encode[len(questions):], "tokenizer": tokenizer, "forks": forks,
            "fork_ids": fork_ids_of(tokenizer, forks["num_forks"], forks["fork_style"])}


def print_start(cfg, run, ctx, names, start, world, device):
    """The config as JSON and the run's shape, on rank 0. names: the N tags' names."""
    print0(json.dumps(dataclasses.asdict(cfg)))
    print0(f"{len(run['questions'])} questions, {world} rank(s) on {device.type}, steps {start}.."
           f"{cfg.steps} of {cfg.batch_size} questions x {cfg.group_size} tags over {names[0]}.."
           f"{names[-1]} ({run['forks']['fork_style']}), training {cfg.trainable}; decoding: "
           f"{ctx['rows']} at once (0: all), layers {'kept' if ctx['keep_gathered'] else 'not kept'}"
           " gathered")


def finish(cfg, log, names, rank):
    """After final/ is written: the log closed, tag_choice.png drawn on rank 0, the closing line."""
    log.close()
    if rank == 0:
        figures.draw_tag_choice(log.records(), names, os.path.join(cfg.out_dir, "tag_choice.png"))
    print0(f"done: {cfg.steps} steps. Outputs in {cfg.out_dir}/: metrics.jsonl (a line a step), "
           "pi_start.json, tag_choice.png, checkpoints/, final/ (model, tokenizer, ssft.json)")


# ----------------------------------------------------------------------------- which questions, which seeds

def step_questions(num_questions, batch_size, steps, seed):
    """[[question index] * batch_size] of every step: seeded permutations of the questions, one after
    another, cut into batches. Where a step crosses from one permutation into the next, a question
    already in its batch waits for the next step: no question appears twice in one step (its G draws
    would count twice). A pure function, so a resumed run takes the same steps. Needs batch_size <=
    num_questions."""
    assert batch_size <= num_questions, (batch_size, num_questions)
    queue, epoch, plan = [], 0, []
    for _ in range(steps):
        batch, taken = [], set()
        while len(batch) < batch_size:
            j = next((j for j, q in enumerate(queue) if q not in taken), None)
            if j is None:  # every queued question is in this batch already: the next permutation
                queue += np.random.default_rng([seed, epoch]).permutation(num_questions).tolist()
                epoch += 1
                continue
            taken.add(queue[j])
            batch.append(queue.pop(j))
        plan.append(batch)
    return plan


def seed_of(*keys):
    """A 62-bit seed derived from integers (seed, step, question, ...)."""
    return int(np.random.default_rng(list(keys)).integers(2 ** 62))


def generators(seed, step, questions, rank, device):
    """The step's generators: one on the CPU per question of `questions` (its tag draws, the same
    whatever the device), and the rank's on `device` (its responses)."""
    return ([torch.Generator().manual_seed(seed_of(seed, step, q)) for q in questions],
            torch.Generator(device).manual_seed(seed_of(seed, step, rank)))


def strided(count, rank, world):
    """(indices, counted): the rank's share of `count` items, strided over the ranks, padded with
    item 0 up to ceil(count / world) so that every rank runs the same forwards; the first `counted`
    are its own."""
    mine = list(range(rank, count, world))
    return mine + [0] * (math.ceil(count / world) - len(mine)), len(mine)


# ----------------------------------------------------------------------------- the SSFT model

def read_ssft(model, trainable, count_fork_tokens, trust_remote_code=False):
    """(ssft.json's record, the tokenizer) of an SSFT final/ directory. DataError naming the file when
    it is missing or wrong, when the tokenizer holds fewer forking tokens than it says
    (count_fork_tokens(tokenizer): data.py's), or when --trainable tag_rows meets text tags."""
    path = os.path.join(model, "ssft.json")
    if not os.path.isfile(path):
        raise DataError(f"--model {model}: no ssft.json (GFPO starts from an SSFT final/ directory)")
    forks = read_json(path)
    if not isinstance(forks, dict) or forks.get("fork_style") not in ("special", "text") \
            or not isinstance(forks.get("num_forks"), int) or forks["num_forks"] < 2:
        raise DataError(f"{path}: need fork_style (special or text) and num_forks >= 2, got {forks}")
    if trainable == "tag_rows" and forks["fork_style"] != "special":
        raise DataError(f"--trainable tag_rows needs special tags ({path}: text tags are ordinary tokens "
                        "that responses use too)")
    tokenizer = load_tokenizer(model, trust_remote_code)  # DataError naming --model
    if forks["fork_style"] == "special" and count_fork_tokens(tokenizer) < forks["num_forks"]:
        raise DataError(f"--model {model}: its tokenizer holds {count_fork_tokens(tokenizer)} forking "
                        f"tokens, ssft.json says {forks['num_forks']}")
    return forks, tokenizer


# ----------------------------------------------------------------------------- the model, the start policy

def start_policy(log_policy_of, prompts, rank, world):
    """log pi_start: [Q, N] of the Q prompts (the run's questions). log_policy_of(prompts) -> [n, N]
    on the CPU runs on every rank with the same count of prompts (padded with the first): rows are
    strided over the ranks, then gathered."""
    padded, counted = strided(len(prompts), rank, world)
    local = log_policy_of([prompts[i] for i in padded])[:counted]
    parts = [None] * world
    dist.all_gather_object(parts, (padded[:counted], local.tolist()))
    out = torch.zeros(len(prompts), local.shape[1])
    for idx, rows in parts:
        out[idx] = torch.tensor(rows)
    return out


def load(cfg, run, plan, policy_module, tag_logits, log_policy, rank, world, device):
    """(model, hf_config, optimizer, first step, log pi_start) of a run: the SSFT model sharded as
    policy_module(lm, fork ids, pad id) (policy.TagPolicy, FSDP2), in eval mode, resumed from
    --out_dir's newest checkpoint. --trainable tag_rows: a tied output matrix untied (the input
    embeddings stay as they are) and lm_head.weight alone trained. log pi_start: {question index:
    [N]} of every question of `plan`, log_policy(tag_logits(model, prompts)["tag_logits"])."""
    rows_only, pad_id = cfg.trainable == "tag_rows", batching.pad_id_of(run["tokenizer"])
    model, hf_config = fsdp.load_model(
        cfg.model, rank, device, lambda lm: policy_module(lm, run["fork_ids"], pad_id), "batch",
        cfg.seed, cfg.activation_checkpointing, cfg.cpu_offload, cfg.trust_remote_code,
        untie=rows_only, trainable=(lambda name: name == "lm_head.weight") if rows_only else None)
    eval_mode(model.lm, cfg.activation_checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ids = sorted({q for batch in plan for q in batch})  # the questions pi_start is needed for

    def log_policy_of(prompts):
        return log_policy(tag_logits(model, prompts, cfg.micro_batch)["tag_logits"])
    try:
        start, _ = fsdp.resume(model, optimizer, cfg.out_dir, rank, device, lambda state: None)
        logpi_start = load_or_make_start(cfg.out_dir, start > 0, ids, lambda: start_policy(
            log_policy_of, [run["prompts"][q] for q in ids], rank, world), rank)
    except DataError as e:
        sys.exit(f"error: {e}")
    return model, hf_config, optimizer, start, dict(zip(ids, logpi_start))


def load_or_make_start(out_dir, resumed, questions, make, rank):
    """pi_start of `questions` (sorted indices): read from out_dir/pi_start.json, written there by the
    first launch (make() computes it, before any update); DataError when a resumed run lacks it."""
    path = os.path.join(out_dir, "pi_start.json")
    saved = read_json(path) if os.path.exists(path) else None
    if saved and saved.get("questions") == questions:
        return torch.tensor(saved["log_pi"])
    if resumed:
        raise DataError(f"{path}: missing or not this run's; a resumed run needs its start policy")
    logpi = make()
    if rank == 0:
        write_json(path, {"questions": questions, "log_pi": logpi.tolist()})
    return logpi


def eval_mode(lm, activation_checkpointing):
    """Every policy forward in eval mode (no dropout), the rollouts' and the update's alike. Hugging
    Face recomputes a decoder layer in backward only when the layer is in train mode: with
    activation checkpointing the layers' own flag is set back, their children (attention dropout)
    staying in eval mode."""
    lm.eval()
    for layer in lm.model.layers if activation_checkpointing else []:
        layer.training = True


# ----------------------------------------------------------------------------- the clip, the signals

def clip_grad_norm(optimizer, grad_clip, loss, step):
    """Clips the global gradient norm of the optimizer's parameters to `grad_clip`; returns the norm
    before clipping (a float, on every rank). SystemExit naming the step when it or the loss is not
    finite: a diverged run stops before its step is taken."""
    grad_norm = fsdp.clip_grad_norm(optimizer.param_groups[0]["params"], grad_clip)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        sys.exit(f"error: step {step}: non-finite loss {loss} / grad norm {grad_norm}")
    return grad_norm


def no_signal(tags, rewards):
    """[B] bool: groups whose policy gradient is zero: all G rewards equal (A = 0), or all G draws the
    same tag (the advantages sum to zero on it, whatever the rewards)."""
    return (rewards == rewards[:, :1]).all(1) | (tags == tags[:, :1]).all(1)


def mutual_information(logpi):
    """I(x; tag) = H(mean pi) - mean H(pi) over the B questions of logpi [B, N] (nats): 0 when every
    question gets the same pi (a global prior over tags), H(mean pi) when each question's pi is one
    tag (a choice per question)."""
    pi = logpi.exp()
    mean = pi.mean(0)
    return float(-(mean * mean.clamp(min=1e-30).log()).sum() + (pi * logpi).sum(-1).mean())


def step_record(step, out, start_rows, loss, names, stats):
    """One metrics.jsonl line from every rank's rollouts (`out`, gfpo.rollouts' dict; start_rows:
    log pi_start of its questions; loss: its share), gathered on every rank:
    mean reward; the tag choice (pi averaged over the questions), its mean entropy and the mutual
    information I(x; tag); the mean tag mass sum_i p(g_i | x) before renormalisation; KL to the start;
    the share of groups with no gradient (and of those with one distinct tag); each tag's mean reward
    where sampled; tokens and truncation; the loss; and `stats` (grad norm, lr, time, held-out Pass@1)."""
    parts = [None] * dist.get_world_size()
    mine = {k: out[k].tolist() for k in ("logpi", "mass", "tags", "rewards", "tokens", "truncated")}
    dist.all_gather_object(parts, mine | {"start": start_rows.tolist(), "loss": loss})
    cat = {k: torch.tensor([row for p in parts for row in p[k]]) for k in ("logpi", "tags", "rewards", "start")}
    rewards, tags, logpi = cat["rewards"], cat["tags"], cat["logpi"]
    mean_pi = logpi.exp().mean(0)
    return {"step": step, "reward": rewards.mean().item(), "tag_choice": mean_pi.tolist(),
            "sampled": torch.bincount(tags.flatten(), minlength=len(names)).tolist(),
            "tag_reward": [rewards[tags == i].mean().item() if (tags == i).any() else None
                           for i in range(len(names))],
            "entropy": (-(logpi.exp() * logpi).sum(-1)).mean().item(),
            "mutual_info": mutual_information(logpi),
            "tag_mass": float(np.mean([m for p in parts for m in p["mass"]])),
            "kl": (logpi.exp() * (logpi - cat["start"])).sum(-1).mean().item(),
            "no_signal": no_signal(tags, rewards).float().mean().item(),
            "one_tag": (tags == tags[:, :1]).all(1).float().mean().item(),
            "mean_tokens": float(np.mean([t for p in parts for row in p["tokens"] for t in row])),
            "truncated": float(np.mean([t for p in parts for row in p["truncated"] for t in row])),
            "loss": sum(p["loss"] for p in parts), **stats}


def step_line(record, steps, left):
    """The step's line on the console."""
    held = f" | held-out {record['held_out_pass@1']:.3f}" if "held_out_pass@1" in record else ""
    return (f"step {record['step'] + 1:4d}/{steps} | reward {record['reward']:.3f} | choice "
            + " ".join(f"{p:.2f}" for p in record["tag_choice"])
            + f" | H {record['entropy']:.3f} | I(x;tag) {record['mutual_info']:.3f}"
            f" | mass {record['tag_mass']:.3f}"
            f" | kl {record['kl']:.4f} | no signal {record['no_signal']:.2f}{held} | {record['time_s']:.1f} s"
            f" | {left} left")
