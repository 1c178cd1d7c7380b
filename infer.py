"""Parallel reasoning with global forking tokens, majority voting and the paper's metrics (Section 2.3).

Response i of a problem is prompted with <think(i mod N + 1)> and the answers are majority-voted
(Cons@k, Section 2.3). The prompt is data.build_text's, the one training used; the part before the
forking token is prefilled once and its KV cache shared by all the problem's responses. Without
aggregation every response uses the single token of largest coverage (Eq. 6, select_token.py), and
a model without forking tokens (an SFT baseline) samples from the plain prompt, same count and settings.

The rows are then scored by score.py (Pass@1, Cons@k, Pass@k, Pass@1 of Native Cons@N and per-token
accuracy; Table 1, Figures 4 and 5), written beside them as <output>.metrics.json.

    python infer.py --model out/ssft/final --data toy --samples 8 --max_new_tokens 128 --limit 20
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --max_new_tokens 32768
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --fork "<think3>"  # Pass@1
    python infer.py --model out/sft/final --data ../shared/data/aime24.jsonl --fork none         # baseline
    torchrun --standalone --nproc_per_node 8 infer.py --model out/ssft/final --data ...          # 8 GPUs
    python score.py eval/aime24.cycle.jsonl       # metrics of an existing rows file (e.g. from vLLM)

Rows go to --output as each problem finishes; rerunning the same command resumes where it stopped.
"""
import copy
import dataclasses
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import score
import toy
from common import (DataError, append_jsonl, changed_settings, close_distributed, init_distributed, parse_flags,
                    print0, read_jsonl, write_json)


@dataclass
class Config:
    model: str = "out/ssft/final"  # a final/ directory from train.py, or any Hugging Face causal LM
    data: str = "../shared/data/math500.jsonl"  # MATH-500/AIME/AMC/GSM8K/training JSONL, or toy (toy.py's held-out set)
    output: str = ""  # rows JSONL ('' = eval/<data name>.<fork>.jsonl); metrics and config beside it
    fork: str = "cycle"  # cycle: response i gets <think(i mod N + 1)>; <thinkK>: all use it; none: baseline
    samples: int = 32  # responses per problem (the paper: 32)
    temperature: float = 0.7  # the paper's sampling temperature; 0 = greedy
    top_p: float = 0.95  # nucleus sampling threshold, the paper's
    max_new_tokens: int = 32768  # tokens per response (the paper's max length)
    batch_size: int = 0  # responses decoded together (0 = all of a problem's); lower it to save memory
    instruction: str = ""  # appended to every problem, e.g. a \boxed{} instruction (AIME files have one)
    limit: int = 0  # only the first `limit` problems (0 = all)
    set_size: int = 6  # native_cons set size when responses use fewer than 2 forking tokens (paper: 6)
    seed: int = 0  # problem i samples with seed + i: results do not depend on ranks or resuming


SAME_ON_RESUME = ("model", "data", "fork", "samples", "temperature", "top_p", "max_new_tokens",
                  "instruction", "seed")  # rows made with other values must not be mixed in one file


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    for name in ("samples", "max_new_tokens", "set_size"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        parser.error(f"need --temperature >= 0 and 0 < --top_p <= 1 (got {cfg.temperature}, {cfg.top_p})")
    return cfg


# ----------------------------------------------------------------------------- files

def load_problems(path, instruction, limit):
    """[{"id", "prompt", "gold"}] of an evaluation file or a training layout: the prompt from prompt,
    problem or question; the gold from answer, ground_truth, gt or solution (data.parse_row's order);
    the id from id, unique_id or idx, else the row's 0-based position."""
    if path == "toy":  # toy.py's held-out questions
        return [{"id": i, "prompt": q["prompt"] + instruction, "gold": q["answer"]}
                for i, q in enumerate(toy.held_out_questions(100))][:limit or None]
    problems, seen = [], set()
    for i, (n, row) in enumerate(read_jsonl(path)):
        row = row if isinstance(row, dict) else {}
        prompt = next((row[k] for k in ("prompt", "problem", "question") if isinstance(row.get(k), str)), "")
        gold = next((row[k] for k in ("answer", "ground_truth", "gt", "solution") if row.get(k) is not None), None)
        pid = row.get("id", row.get("unique_id", row.get("idx", i)))
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(f"{path}:{n}: an id must be a string or an integer, got {json.dumps(pid)}")
        if not prompt.strip() or gold is None:
            raise DataError(f"{path}:{n}: need a prompt ('prompt', 'problem' or 'question') and a "
                            "gold answer ('answer', 'ground_truth', 'gt' or 'solution')")
        if pid in seen:
            raise DataError(f"{path}:{n}: duplicate id {pid!r}")
        seen.add(pid)
        problems.append({"id": pid, "prompt": prompt + instruction, "gold": score.gold_answer(gold)})
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems[:limit or None]


# ----------------------------------------------------------------------------- generation

def sample(logits, temperature, top_p, generator):
    """logits: [B, V] -> next token ids [B]. Temperature 0 is greedy; otherwise nucleus sampling from
    the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits.float() / temperature, -1).sort(-1, descending=True)
    probs[probs.cumsum(-1) - probs >= top_p] = 0  # the tokens before this one already reach top_p
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]


def cache_keyword(model):
    """The keyword of the KV cache in forward(): `cache` from transformers 5.24 on, `past_key_values`
    before (which silently ignores an unknown `cache=`, decoding without the prompt)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate(model, prefix_ids, first_ids, max_new_tokens, temperature, top_p, stop_ids, generator, batch_size=0):
    """Responses that share one prompt. prefix_ids: the shared prompt, prefilled once; first_ids: [S]
    each response's first input id (its forking token). Returns S pairs (ids, finished): the new
    tokens, cut before the first stop token, and whether one came within max_new_tokens.

    Responses are decoded batch_size at a time (0: all S at once), each batch from a copy of the
    prefilled cache. All rows of a batch have the same length, so no padding or attention mask is
    needed; a row that stops leaves the batch and its cache rows are dropped."""
    device, kv = next(model.parameters()).device, cache_keyword(model)
    out = model(torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1)
    prefix = out["cache"] if "cache" in out else out["past_key_values"]
    result, chunk = [], batch_size or len(first_ids)
    for start in range(0, len(first_ids), chunk):
        firsts = first_ids[start:start + chunk]
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(firsts))  # [1, heads, P, dim] -> [len(firsts), heads, P, dim]
        ids, finished = [[] for _ in firsts], [False] * len(firsts)
        live, tokens = list(range(len(firsts))), torch.tensor(firsts, device=device)
        for _ in range(max_new_tokens):
            logits = model(tokens[:, None], use_cache=True, **{kv: cache}).logits[:, -1]
            tokens = sample(logits, temperature, top_p, generator)
            keep = []
            for j, (row, t) in enumerate(zip(live, tokens.tolist())):
                if t in stop_ids:
                    finished[row] = True
                else:
                    ids[row].append(t)
                    keep.append(j)
            if not keep:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                tokens, live = tokens[index], [live[j] for j in keep]
        result += zip(ids, finished)
    return result


def response_forks(tokenizer, cfg):
    """The forking token of each response: <think1>, ..., <thinkN>, <think1>, ... (cycle), one token
    for all (<thinkK>), or None for the plain prompt (none). SystemExit on a bad --fork."""
    if cfg.fork == "none":
        return [None] * cfg.samples
    names = data.fork_tokens(data.count_fork_tokens(tokenizer))
    if cfg.fork == "cycle" and names:
        return [names[i % len(names)] for i in range(cfg.samples)]
    if cfg.fork not in names:
        found = f"{names[0]}..{names[-1]}" if names else "none (use --fork none for a baseline)"
        raise SystemExit(f"error: --fork {cfg.fork}: the forking tokens of --model {cfg.model} are {found}")
    return [cfg.fork] * cfg.samples


def solve(model, tokenizer, problem, forks, cfg, stop_ids, seed):
    """One problem -> its output row. Each response's prompt is data.build_text(prompt, fork), with the
    prompt tokenised as training did (data.encode_prompt); all end in one token after a shared
    prefix (the forking token, or the plain prompt's last token)."""
    prompt_ids = data.encode_prompt(tokenizer, problem["prompt"])
    if forks[0] is None:  # a baseline: the plain prompt
        prefix, firsts = prompt_ids[:-1], [prompt_ids[-1]] * len(forks)
    else:
        prefix, firsts = prompt_ids, tokenizer.convert_tokens_to_ids(forks)
    generator = torch.Generator(model.device).manual_seed(seed)
    responses = generate(model, prefix, firsts, cfg.max_new_tokens, cfg.temperature,
                         cfg.top_p, stop_ids, generator, cfg.batch_size)
    completions = []
    for fork, (ids, finished) in zip(forks, responses):
        text = tokenizer.decode(ids)
        pred = score.last_boxed(text)
        completions.append({"fork": fork, "text": text, "pred": pred, "correct": score.is_equiv(pred, problem["gold"]),
                            "tokens": len(ids), "finished": finished})
    return {"id": problem["id"], "prompt": problem["prompt"], "gold": problem["gold"], "completions": completions}


def main(cfg):
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # every check before the model loads, on every rank alike; nothing is written before it loads
    problems = load_problems(cfg.data, cfg.instruction, cfg.limit)
    name = os.path.splitext(os.path.basename(cfg.data))[0]
    output = cfg.output or os.path.join("eval", f"{name}.{cfg.fork.strip('<>')}.jsonl")
    base = output.removesuffix(".jsonl")
    done = {r["id"] for _, r in read_jsonl(output, drop_truncated_tail=True)} if os.path.exists(output) else set()
    changed = changed_settings(base + ".config.json", cfg, SAME_ON_RESUME) if done else {}
    if changed:
        raise SystemExit(f"error: {output} holds rows made with "
                         f"{', '.join(f'--{k} {v!r}' for k, v in changed.items())}: "
                         "pass the same values to resume, or a new --output")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: --model {cfg.model}: not a model directory or hub name "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    forks = response_forks(tokenizer, cfg)

    rank, world, device = init_distributed()  # plain python: a world of one
    try:
        # bf16 as trained on GPUs; fp32 on CPU
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation="sdpa")
        except (OSError, ValueError, TypeError) as e:
            raise SystemExit(f"error: --model {cfg.model}: cannot load a causal LM "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        model = model.to(device).eval()
        eos = model.generation_config.eos_token_id
        stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        print0(json.dumps(dataclasses.asdict(cfg)))
        if rank == 0:
            os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
            write_json(base + ".config.json", dataclasses.asdict(cfg))
        todo = [(i, p) for i, p in enumerate(problems) if p["id"] not in done]
        print0(f"{len(problems)} problems, {len(problems) - len(todo)} already in {output}, "
               f"{cfg.samples} responses each, forking tokens: {list(dict.fromkeys(forks))}")

        bar = tqdm(total=len(todo), disable=rank != 0, desc="problems")
        # problems strided over ranks; rank 0 alone writes, so each round's rows are gathered to it
        for start in range(0, len(todo), world):
            mine = todo[start + rank] if start + rank < len(todo) else None
            row = solve(model, tokenizer, mine[1], forks, cfg, stop_ids, cfg.seed + mine[0]) if mine else None
            rows = [None] * world if rank == 0 else None
            dist.gather_object(row, rows, dst=0)
            if rank == 0:
                for r in filter(None, rows):
                    append_jsonl(output, r)
                bar.update(sum(r is not None for r in rows))
        bar.close()

        metrics = None
        if rank == 0:  # the rows of this run's problems, scored
            by_id = {r["id"]: r for r in score.read_rows(output)}
            metrics = score.score_rows([by_id[p["id"]] for p in problems], output, cfg.set_size)
        return metrics
    finally:
        close_distributed()


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
