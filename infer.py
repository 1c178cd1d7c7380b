"""Parallel reasoning with global forking tokens, majority voting and the paper's metrics (Section 2.3).

Each response of a problem is prompted with one forking tag after the prompt, <think1> .. <thinkN>
in turn, and the answers are majority-voted (Cons@k); without aggregation every response uses the
single token of largest coverage (Eq. 6, select_token.py) or, with --fork auto, the tag the model
itself chooses after the prompt (policy.py's pi; trained by gfpo.py), and a model without forking tokens (an
SFT baseline) samples from the plain prompt, same count and settings. The prompt is
data.build_text's, the one training used: the part before the tag is prefilled once and its KV
cache shared by all the problem's responses. The rows are then scored by score.py (Pass@1, Cons@k,
Pass@k, Pass@1 of Native Cons@N, per-token accuracy; Table 1, Figures 4 and 5) into
<output>.metrics.json.

Prompts (--instruction auto): math files (MATH-500, AIME, AMC, GSM8K) get LightEval's math prompt and
multiple-choice files (GPQA-Diamond) its multiple-choice prompt, the ones the paper's evaluation used
(lighteval 0.10.1.dev0 as vendored by the authors' repository Sheng-J/SSFT; the same text from
lighteval PR #586 to v0.12); training layouts and the toy get their prompt as it is, as in training.
--protocol official evaluates the authors' released checkpoint their way: text tags
"<|im_start|><thinkI>\\n" for N = 6 (unless the model's final/ssft.json says otherwise), block order (token 1 the first S = samples/N responses, token 2 the
next S, ...), 66 samples on AIME and 36 elsewhere (32 of one token with --fork <thinkK>), T = 0.7,
top_p 0.95, 32768 new tokens (docs/reproducing.md).

    python infer.py --model out/ssft/final --data toy --samples 8 --max_new_tokens 128 --limit 20
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --max_new_tokens 32768
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --fork "<think3>"  # Pass@1
    python infer.py --model out/sft/final --data ../shared/data/aime24.jsonl --fork none         # baseline
    python infer.py --model out/gfpo/final --data toy --fork auto --samples 16 --max_new_tokens 64  # own tag
    python infer.py --model SSFT-32B --data ../shared/data/math500.jsonl --protocol official     # released model
    python infer.py --model out/ssft/final --data ../shared/data/math500.jsonl --show_prompts    # check by eye
    torchrun --standalone --nproc_per_node 8 infer.py --model out/ssft/final --data ...          # 8 GPUs
    python score.py eval/ssft/aime24.all.jsonl  # metrics of an existing rows file (infer.py writes eval/<model>/...)

Rows go to --output as each problem finishes; rerunning the same command resumes where it stopped.
"""
import copy
import dataclasses
import inspect
import json
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import match
import policy
import score
import toy
from plumbing.ranks import close_distributed, init_distributed, print0
from plumbing.files import DataError, append_jsonl, changed_settings, read_json, read_jsonl, write_json
from plumbing.flags import parse_flags
from plumbing import decoding, evalfiles, grader, memory


@dataclass
class Config:
    model: str = "out/ssft/final"  # a final/ directory from train.py, or any Hugging Face causal LM
    data: str = "../shared/data/math500.jsonl"  # MATH-500/AIME/AMC/GSM8K/GPQA/training JSONL or Parquet, or toy
    output: str = ""  # rows JSONL ('' = eval/<model name>/<data name>.<fork>.jsonl); metrics and config beside it
    fork: str = "all"  # all: every forking token in --tag_order; <thinkK>: all responses use it; none: baseline; auto: the model's choice (policy.py)
    auto_choice: str = "greedy"  # --fork auto: greedy (every response the most likely tag) | sample (each draws from pi)
    tag_order: str = "cycle"  # cycle: response i gets token i mod N; block: token k the k-th block of samples/N
    fork_style: str = "auto"  # special | text (data.py) | auto: the model's (final/ssft.json, else its tokens)
    num_forks: int = 0  # N for --fork_style text (0: the model's, from final/ssft.json)
    protocol: str = "ours"  # ours | official: the authors' evaluation of their released checkpoint (above)
    instruction: str = "auto"  # auto | none | a prompt template holding {question} (else appended to it)
    samples: int = 32  # responses per problem (the paper: 32)
    temperature: float = 0.7  # the paper's sampling temperature; 0 = greedy
    top_p: float = 0.95  # nucleus sampling threshold, the paper's
    max_new_tokens: int = 32768  # tokens per response (the paper's max length)
    batch_size: int = 0  # responses decoded together (0 = all of a problem's); lower it to save memory
    limit: int = 0  # only the first `limit` problems (0 = all)
    set_size: int = 6  # native_cons set size when responses use fewer than 2 forking tokens (paper: 6)
    seed: int = 0  # problem i samples with seed + i: results do not depend on ranks or resuming
    show_prompts: bool = False  # print the exact prompt of every forking tag for the first problem, then exit


SAME_ON_RESUME = ("model", "data", "fork", "auto_choice", "tag_order", "fork_style", "num_forks", "instruction", "samples",
                  "temperature", "top_p", "max_new_tokens", "seed")  # rows made otherwise must not mix in a file

# LightEval's prompts, verbatim (two spaces after "clearly."); {question} is the problem's text
AUTO = "auto"  # the fork of a response whose tag the model chooses (--fork auto)
def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    preset = {}
    if given.get("protocol") == "official":
        preset = {**evalfiles.OFFICIAL, "samples": evalfiles.official_samples(given.get("data", Config.data), given.get("fork", "all"))}
    cfg = Config(**{**preset, **given})  # flags given win over the preset
    problems = [f"--{k} must be >= 1 (got {getattr(cfg, k)})" for k in ("samples", "max_new_tokens", "set_size")
                if getattr(cfg, k) < 1]
    problems += [f"--{k} must be one of {', '.join(v)} (got {getattr(cfg, k)!r})" for k, v in (
        ("tag_order", ("cycle", "block")), ("auto_choice", ("greedy", "sample")), ("fork_style", ("auto", *data.FORK_STYLES)), ("protocol", ("ours", "official")))
        if getattr(cfg, k) not in v]
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        problems.append(f"need --temperature >= 0 and 0 < --top_p <= 1 (got {cfg.temperature}, {cfg.top_p})")
    if cfg.num_forks < 0 or cfg.limit < 0 or cfg.batch_size < 0:
        problems.append("--num_forks, --limit and --batch_size must be >= 0")
    if problems:
        parser.error("; ".join(problems))
    return cfg


# ----------------------------------------------------------------------------- problems

def response_tags(tokenizer, cfg):
    """(fork name per response, the token ids of each name's tag, the style). Names are <thinkK>
    (data.fork_tokens) in --tag_order, or None for the plain prompt (--fork none). The style and N
    come from the flags, else from the model: final/ssft.json, else its reserved tokens.
    SystemExit naming the flag when they cannot be found."""
    if cfg.fork == "none":
        return [None] * cfg.samples, {}, None
    saved = os.path.join(cfg.model, "ssft.json")
    saved = read_json(saved) if os.path.isfile(saved) else {}
    default_style, default_n = evalfiles.OFFICIAL_TAGS if cfg.protocol == "official" else ("special", 0)
    style = cfg.fork_style if cfg.fork_style != "auto" else saved.get("fork_style", default_style)
    reserved = data.count_fork_tokens(tokenizer)
    n = cfg.num_forks or saved.get("num_forks") or (reserved if style == "special" else default_n)
    if style == "special" and n > reserved:
        raise SystemExit(f"error: --model {cfg.model} holds {reserved} reserved forking tokens, not {n}"
                         + (": --fork none for a baseline, or --fork_style text --num_forks N for a model trained on "
                            "text tags (the authors' released checkpoint: --protocol official)" if not reserved else ""))
    if not n:
        raise SystemExit("error: --fork_style text needs --num_forks N (the model has no ssft.json to tell it)")
    names = data.fork_tokens(n)
    if cfg.fork not in ("all", "auto") and cfg.fork not in names:
        raise SystemExit(f"error: --fork {cfg.fork}: the forking tokens of --model {cfg.model} are "
                         f"{names[0]}..{names[-1]} (or all, auto or none)")
    try:
        ids = dict(zip(names, data.fork_ids(tokenizer, n, style) if style == "text" else
                       [[i] for i in tokenizer.convert_tokens_to_ids(names)]))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.fork == "auto":  # chosen per problem by solve()
        return [AUTO] * cfg.samples, ids, style
    if cfg.fork != "all":
        return [cfg.fork] * cfg.samples, ids, style
    if cfg.tag_order == "block":  # token k answers the k-th block, the first blocks one longer if N does not divide
        return [name for name, count in zip(names, score.fair_split_counts(cfg.samples, n)) for _ in range(count)], \
            ids, style
    return [names[i % n] for i in range(cfg.samples)], ids, style


# ----------------------------------------------------------------------------- generation

def solve(model, tokenizer, problem, forks, tag_ids, stop_ids, cfg, seed):
    """One problem -> its output row. Each response's prompt is data.build_text(prompt, tag), with
    the prompt tokenised as training did (data.encode_prompt) and the tag's ids after it; the prompt
    is the shared prefix (a baseline's: all but its last token, which each response starts with)."""
    prompt_ids = data.encode_prompt(tokenizer, problem["prompt"])
    generator = torch.Generator(model.device).manual_seed(seed)
    chosen = {}
    if forks[0] == AUTO:  # the model picks: pi over its N tags after the prompt (policy.py)
        forks, chosen = choose_forks(model, tokenizer, prompt_ids, tag_ids, len(forks), cfg.auto_choice, seed)
    if forks[0] is None:  # a baseline: the plain prompt
        prefix, starts = prompt_ids[:-1], [prompt_ids[-1:]] * len(forks)
    else:
        prefix, starts = prompt_ids, [tag_ids[f] for f in forks]
    responses = decoding.generate(model, prefix, starts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop_ids, generator,
                         cfg.batch_size)
    completions = []
    for fork, (ids, finished) in zip(forks, responses):
        text = tokenizer.decode(ids)
        pred, correct = grader.grade(text, problem["gold"], problem["kind"], finished=finished,
                                     question=problem["prompt"])
        completions.append({"fork": fork, "text": text, "pred": pred, "correct": correct, "tokens": len(ids),
                            "finished": finished})
    return {"id": problem["id"], "prompt": problem["prompt"], "gold": problem["gold"], "kind": problem["kind"],
            "template": problem["template"], "tag_order": cfg.tag_order, **chosen, "completions": completions}


def choose_forks(model, tokenizer, prompt_ids, tag_ids, count, choice, seed):
    """--fork auto: (the fork of each of `count` responses, {"fork_policy": {name: pi}}). pi(i | x) is
    the model's distribution over its tags after the prompt, renormalised over them; greedy gives
    every response the most likely tag, sample draws each response's tag from pi (seeded)."""
    names = list(tag_ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        logpi = policy.log_policy(policy.tag_log_probs(match.SequenceNLL(model), [prompt_ids], list(tag_ids.values()),
                                                       pad_id, model.device)).cpu()
    picks = policy.choose_tags(logpi, count, choice == "greedy", torch.Generator().manual_seed(seed))[0]
    return [names[i] for i in picks.tolist()], {"fork_policy": dict(zip(names, logpi[0].exp().tolist()))}


def show_prompts(tokenizer, problem, forks, tag_ids, style, auto_choice="greedy"):
    """Prints the exact prompt of every forking tag for `problem`, and its token ids: a format can be
    checked by eye before any weights load. --fork auto: every tag the model chooses among."""
    if forks[0] == AUTO:
        print(f"--fork auto: the model scores each tag below after the prompt, pi(tag | prompt) = softmax over the "
              f"{len(tag_ids)} tags of log p(tag's tokens | prompt), and "
              + ("every response takes the most likely tag" if auto_choice == "greedy" else
                 "each response draws its tag from pi") + " (the row records pi as fork_policy)")
        forks = list(tag_ids)
    for fork in dict.fromkeys(forks):
        text = data.build_text(tokenizer, problem["prompt"], data.fork_tag(fork, style) if fork else "")
        ids = data.encode_prompt(tokenizer, problem["prompt"]) + (tag_ids[fork] if fork else [])
        print(f"----- {fork or 'no forking token'} ({len(ids)} tokens; tag ids {tag_ids.get(fork, [])})\n{text}")


def check_memory(cfg, device):
    """Refuses, before loading, a model whose weights and KV cache cannot fit one rank: every rank
    holds a whole copy (read on its CPU first), and the cache of --batch_size (or --samples) streams
    of a 1024-token prompt + --max_new_tokens (memory.infer_plan: 256 GiB for 32B, 32 x 32k)."""
    try:
        shape = memory.read_shape(cfg.model)
    except ValueError:  # no plain config.json: from_pretrained says what is wrong
        return
    streams, context = cfg.batch_size or cfg.samples, memory.PROMPT_TOKENS + cfg.max_new_tokens
    weights, kv = memory.infer_plan(shape, streams, context, 2 if device.type == "cuda" else 4)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / memory.GIB \
        / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    have = torch.cuda.get_device_properties(device).total_memory / memory.GIB if device.type == "cuda" else host
    if weights + kv > have or weights > host:
        raise SystemExit(f"error: --model {cfg.model}: {weights:.0f} GiB of weights + {kv:.0f} GiB of KV cache "
                         f"({streams} streams x {context} tokens) do not fit {have:.0f} GiB on {device.type} per rank "
                         f"(host {host:.0f} GiB): infer.py keeps a whole model per rank; lower --batch_size or "
                         "--max_new_tokens, or serve it with vLLM (docs/vllm.md)")


def main(cfg):
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # every check before the model loads, on every rank alike; nothing is written before it loads
    toy_rows = toy.held_out_records(cfg.limit or 100) if cfg.data == "toy" else None
    problems = evalfiles.load_problems(cfg.data, cfg.instruction, cfg.limit, toy_rows)
    name = os.path.splitext(os.path.basename(cfg.data))[0]
    output = cfg.output or os.path.join("eval", evalfiles.model_name(cfg.model), f"{name}.{cfg.fork.strip('<>')}.jsonl")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: --model {cfg.model}: not a model directory or hub name "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    forks, tag_ids, style = response_tags(tokenizer, cfg)
    if cfg.show_prompts:
        return show_prompts(tokenizer, problems[0], forks, tag_ids, style, cfg.auto_choice)
    base = output.removesuffix(".jsonl")
    done = {r["id"] for _, r in read_jsonl(output, drop_truncated_tail=True)} if os.path.exists(output) else set()
    changed = changed_settings(base + ".config.json", cfg, SAME_ON_RESUME) if done else {}
    if changed:
        raise SystemExit(f"error: {output} holds rows made with "
                         f"{', '.join(f'--{k} {v!r}' for k, v in changed.items())}: "
                         "pass the same values to resume, or a new --output")

    rank, world, device = init_distributed()  # plain python: a world of one
    try:
        check_memory(cfg, device)
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
               f"{cfg.samples} responses each, forking tags ({style}, {cfg.tag_order} order): "
               + (f"chosen by the model ({cfg.auto_choice}) among {list(tag_ids)}" if forks[0] == AUTO else
                  f"{[data.fork_tag(f, style) if f else None for f in dict.fromkeys(forks)]}"))

        bar = tqdm(total=len(todo), disable=rank != 0, desc="problems")
        # problems strided over ranks; rank 0 alone writes, so each round's rows are gathered to it
        for start in range(0, len(todo), world):
            mine = todo[start + rank] if start + rank < len(todo) else None
            row = solve(model, tokenizer, mine[1], forks, tag_ids, stop_ids, cfg, cfg.seed + mine[0]) if mine else None
            rows = [None] * world if rank == 0 else None
            dist.gather_object(row, rows, dst=0)
            if rank == 0:
                for r in filter(None, rows):
                    append_jsonl(output, r)
                bar.update(sum(r is not None for r in rows))
        bar.close()

        metrics = None
        if rank == 0:  # the rows of this run's problems, scored
            by_id = {r.get("id"): r for r in evalfiles.read_rows(output)}
            metrics = score.score_rows([by_id[p["id"]] for p in problems], output, cfg.set_size)
        return metrics
    finally:
        close_distributed()


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
