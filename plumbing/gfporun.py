"""What keeps a GFPO run going (gfpo.py), off the method's reading path: which questions each step
takes, the start policy kept for the KL and for resuming, the weights gathered for decoding under
FSDP with every rank running the same forwards, and the signals logged per step.
"""
import math
import os
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from plumbing import batching, decoding, fsdp, memory, memory_report
from plumbing.files import DataError, read_json, write_json
from plumbing.ranks import all_max, print0


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


# ----------------------------------------------------------------------------- the SSFT model

def read_ssft(model, trainable, count_fork_tokens, trust_remote_code=False):
    """(ssft.json's record, the tokenizer) of an SSFT final/ directory. DataError naming the file when
    it is missing or wrong, when the tokenizer holds fewer forking tokens than it says
    (count_fork_tokens(tokenizer): data.py's), or when --trainable tag_rows meets text tags."""
    from transformers import AutoTokenizer
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
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"--model {model}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if forks["fork_style"] == "special" and count_fork_tokens(tokenizer) < forks["num_forks"]:
        raise DataError(f"--model {model}: its tokenizer holds {count_fork_tokens(tokenizer)} forking "
                        f"tokens, ssft.json says {forks['num_forks']}")
    return forks, tokenizer


def plan_exit(cfg):
    """gfpo.py --plan GPUSxGiB: the rollout plan of --model's config.json; exit 0 if it fits, 3 if not."""
    gpus, gib = memory.parse_gpus(cfg.plan)
    try:
        plan = memory.gfpo_plan(memory.read_shape(cfg.model), gpus, gib, cfg.batch_size // gpus
                                * cfg.group_size, memory.PROMPT_TOKENS + cfg.max_new_tokens, cfg.cpu_offload)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print("\n".join(memory_report.format_gfpo_plan(plan, gpus, gib)))
    sys.exit(0 if plan["fits"] else 3)


# ----------------------------------------------------------------------------- the start policy

def start_policy(log_policy_of, prompts, rank, world):
    """log pi_start: [Q, N] of the Q prompts (the run's questions). log_policy_of(prompts) -> [n, N]
    on the CPU runs on every rank with the same count of prompts (padded with the first): rows are
    strided over the ranks, then gathered."""
    mine = list(range(rank, len(prompts), world))
    padded = [prompts[i] for i in mine] + [prompts[0]] * (math.ceil(len(prompts) / world) - len(mine))
    local = log_policy_of(padded)[:len(mine)]
    parts = [None] * world
    dist.all_gather_object(parts, (mine, local.tolist()))
    out = torch.zeros(len(prompts), local.shape[1])
    for idx, rows in parts:
        out[idx] = torch.tensor(rows)
    return out


def load(cfg, plan, wrap, log_policy_of, prompts, rank, world, device):
    """(model, hf_config, optimizer, first step, log pi_start [Q, N] of the run's questions, sorted) of
    a run: the SSFT model sharded as wrap(lm) (FSDP2), in eval mode, resumed from --out_dir's newest
    checkpoint. --trainable tag_rows: a tied output matrix untied (the input embeddings stay as they
    are) and lm_head.weight alone trained. log_policy_of(model, prompts) -> [n, N]: pi_start's rows."""
    rows_only = cfg.trainable == "tag_rows"
    model, hf_config = fsdp.load_model(
        cfg.model, rank, device, wrap, "batch", cfg.seed, cfg.activation_checkpointing, cfg.cpu_offload,
        cfg.trust_remote_code, untie=rows_only,
        trainable=(lambda name: name == "lm_head.weight") if rows_only else None)
    eval_mode(model.lm, cfg.activation_checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ids = sorted({q for batch in plan for q in batch})  # the questions pi_start is needed for
    try:
        start, _ = fsdp.resume(model, optimizer, cfg.out_dir, rank, device, lambda state: None)
        logpi_start = load_or_make_start(cfg.out_dir, start > 0, ids, lambda: start_policy(
            lambda ps: log_policy_of(model, ps), [prompts[q] for q in ids], rank, world), rank)
    except DataError as e:
        sys.exit(f"error: {e}")
    return model, hf_config, optimizer, start, logpi_start


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


# ----------------------------------------------------------------------------- decoding under FSDP

def decoding_setup(cfg, run, model, world, device):
    """What decoding needs (gfpo.respond's ctx): tag ids, stop ids, the forking tokens a response never
    samples, and how: on CUDA memory.gfpo_plan decides --gen_batch 0 and --keep_gathered auto
    (SystemExit when no response fits); on the CPU all rows at once, gathered."""
    rows, keep = cfg.gen_batch, cfg.keep_gathered == "yes"
    if device.type == "cuda" and (not rows or cfg.keep_gathered == "auto"):
        gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
        longest = max(map(len, run["prompts"] + run["held_out_prompts"]))
        plan = memory.gfpo_plan(memory.read_shape(model.lm.config.to_dict()), world, gib,
                                cfg.batch_size // world * cfg.group_size, longest + cfg.max_new_tokens,
                                cfg.cpu_offload)
        print0("\n".join(memory_report.format_gfpo_plan(plan, world, gib)))
        if not plan["fits"]:
            sys.exit(f"error: not one response of {cfg.max_new_tokens} tokens fits beside the weights: "
                     "--cpu_offload true, a smaller --max_new_tokens or more GPUs")
        keep = plan["keep_gathered"] if cfg.keep_gathered == "auto" else keep
        rows = rows or plan["ways"]["gathered" if keep else "sharded"]["at_once"]
    elif cfg.keep_gathered == "auto":
        keep = True
    tokenizer = run["tokenizer"]
    pad_id = batching.pad_id_of(tokenizer)
    special = run["forks"]["fork_style"] == "special"
    return {"fork_ids": run["fork_ids"], "stop_ids": decoding.stop_ids(tokenizer, model.lm),
            "tokenizer": tokenizer,
            "banned": [t[0] for t in run["fork_ids"]] if special else [], "pad_id": pad_id, "device": device,
            "rows": rows, "keep_gathered": keep}



@contextmanager
def decoding_weights(model, keep_gathered, device, pad_id):
    """The causal LM inside the sharded `model` (gfpo.py's policy module), ready to decode: the root's
    parameters gathered (embeddings, final norm, output rows), and with keep_gathered every decoder
    layer's too, kept for the whole block instead of gathered again by every forward (the memory
    plan says when they fit). On leaving, ranks that ran fewer forwards run one-token forwards up to
    the busiest rank's count (each gathers its layers, a collective), then all is resharded."""
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


def eval_mode(lm, activation_checkpointing):
    """Every policy forward in eval mode (no dropout), the rollouts' and the update's alike. Hugging
    Face recomputes a decoder layer in backward only when the layer is in train mode: with
    activation checkpointing the layers' own flag is set back, their children (attention dropout)
    staying in eval mode."""
    lm.eval()
    for layer in lm.model.layers if activation_checkpointing else []:
        layer.training = True


# ----------------------------------------------------------------------------- the signals

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
