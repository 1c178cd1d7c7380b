"""Parallel reasoning with global forking tokens (Section 2.3): one response per tag, then a vote.

Each response of a problem is prompted with one forking tag after the prompt, <think1> .. <thinkN>
in turn, and its answer joins the vote (Cons@k, score.py; infer.py prints score.py's default, the
vote expected over the order of each tag's responses; `score.py --cons first` is the paper's own).
Without aggregation every response takes one tag: the token of largest coverage (--fork <thinkK>,
Eq. 6: select_token.py), or the tag the model itself chooses after the prompt (--fork auto:
policy.py's pi, trained by gfpo.py). A model without forking tokens (an SFT baseline) samples from
the plain prompt (--fork none). The prompt is the one training used (data.build_text): its part
before the tag is prefilled once and its KV cache shared by all the problem's responses
(plumbing/decoding.py). The rows are scored by score.py into <output>.metrics.json.

Evaluation files get the prompts of the paper's evaluation (LightEval's math and multiple-choice
prompts); training layouts and the toy get theirs as trained. --protocol official prompts the
authors' released checkpoint their way (text tags, block order, their sample counts):
plumbing/evalfiles.py and docs/reproducing.md.

    python infer.py --model out/ssft/final --data toy --samples 16 --max_new_tokens 64  # the toy
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl           # Cons@k
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --fork "<think3>"
    python infer.py --model out/sft/final --data ../shared/data/aime24.jsonl --fork none  # baseline
    python infer.py --model out/gfpo/final --data toy --fork auto --max_new_tokens 64      # own tag
    python infer.py --model out/ssft/final --data ../shared/data/math500.jsonl --show_prompts
    torchrun --standalone --nproc_per_node 8 infer.py --model out/ssft/final --data ...    # 8 GPUs

Rows go to --output as each problem finishes; rerunning the same command resumes where it stopped.
"""
import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import policy
import score
import toy
from plumbing import decoding, evalfiles, grader, memory_report
from plumbing.batching import pad_id_of
from plumbing.files import DataError, append_jsonl, model_problem, read_json, write_json
from plumbing.flags import check, parse_flags
from plumbing.ranks import close_distributed, init_distributed, print0


@dataclass
class Config:
    model: str = "out/ssft/final"  # a final/ directory from train.py, or any Hugging Face causal LM
    data: str = "../shared/data/math500.jsonl"  # MATH-500/AIME/AMC/GSM8K/GPQA/training JSONL or
    # Parquet, or toy (its held-out questions)
    output: str = ""  # rows JSONL ('' = eval/<model name>/<data name>.<fork>.jsonl), metrics beside
    fork: str = "all"  # all: every forking token in --tag_order; <thinkK>: all responses use it;
    # none: the plain prompt (a baseline); auto: the model's own choice (policy.py)
    auto_choice: str = "greedy"  # --fork auto: greedy (every response the most likely tag) | sample
    tag_order: str = "cycle"  # cycle: response i gets token i mod N; block: token k the k-th block
    fork_style: str = "auto"  # special | text (data.py) | auto: the model's (final/ssft.json, else
    # its reserved tokens)
    num_forks: int = 0  # N for --fork_style text (0: the model's, from final/ssft.json)
    protocol: str = "ours"  # ours | official: the authors' evaluation of their released checkpoint
    instruction: str = "auto"  # auto | none | a template holding {question} (else appended to it)
    samples: int = 32  # responses per problem (the paper: 32)
    temperature: float = 0.7  # the paper's sampling temperature; 0 = greedy
    top_p: float = 0.95  # nucleus sampling threshold, the paper's
    max_new_tokens: int = 32768  # tokens per response (the paper's max length)
    batch_size: int = 0  # responses decoded together (0 = all of a problem's); lower: less memory
    limit: int = 0  # only the first `limit` problems (0 = all)
    set_size: int = 6  # native_cons set size when responses use < 2 forking tokens (paper: 6)
    seed: int = 0  # problem i samples with seed + i: results do not depend on ranks or resuming
    show_prompts: bool = False  # print the exact prompt of every tag for the first problem, exit


RULES = {"samples": ">= 1", "max_new_tokens": ">= 1", "set_size": ">= 1",
         "tag_order": ("cycle", "block"), "auto_choice": ("greedy", "sample"),
         "fork_style": ("auto", *data.FORK_STYLES), "protocol": ("ours", "official"),
         "temperature": ">= 0", "top_p": "(0, 1]", "num_forks": ">= 0", "limit": ">= 0",
         "batch_size": ">= 0"}
SAME_ON_RESUME = ("model", "data", "fork", "auto_choice", "tag_order", "fork_style", "num_forks",
                  "instruction", "samples", "temperature", "top_p", "max_new_tokens",
                  "seed")  # rows made otherwise must not mix in one file
AUTO = "auto"  # the fork of a response whose tag the model chooses (--fork auto)


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    preset = {}
    if given.get("protocol") == "official":
        data_path, fork = given.get("data", Config.data), given.get("fork", "all")
        samples = evalfiles.official_samples(data_path, fork)
        preset = {**evalfiles.OFFICIAL, "samples": samples}
    cfg = Config(**{**preset, **given})  # flags given win over the preset
    check(parser, cfg, RULES, [model_problem(cfg.model)])
    return cfg


# ----------------------------------------------------------------------------- the tags

def model_tags(tokenizer, cfg):
    """({name: token ids of its tag} of the model's forking tokens <think1>..<thinkN>, the style).
    The style and N come from the flags, else from the model: final/ssft.json, else its reserved
    tokens. SystemExit naming the flag when they cannot be found."""
    saved = os.path.join(cfg.model, "ssft.json")
    saved = read_json(saved) if os.path.isfile(saved) else {}
    official = cfg.protocol == "official"
    default_style, default_n = evalfiles.OFFICIAL_TAGS if official else ("special", 0)
    style = cfg.fork_style if cfg.fork_style != "auto" else saved.get("fork_style", default_style)
    reserved = data.count_fork_tokens(tokenizer)
    n = cfg.num_forks or saved.get("num_forks") or (reserved if style == "special" else default_n)
    baseline = ("--fork none samples it from the plain prompt, a baseline; a model trained on text "
                "tags (the authors' released checkpoint) takes --fork_style text --num_forks N, or "
                "--protocol official")
    if style == "special" and not n:
        raise SystemExit(f"error: --model {cfg.model} holds no forking tokens: {baseline}")
    if style == "special" and n > reserved:
        raise SystemExit(f"error: --model {cfg.model} holds {reserved} reserved forking tokens, "
                         f"not {n}")
    if not n:
        raise SystemExit("error: --fork_style text needs --num_forks N (the model has no ssft.json "
                         "to tell it)")
    names = data.fork_tokens(n)
    try:
        ids = data.fork_ids(tokenizer, n, style) if style == "text" else \
            [[i] for i in tokenizer.convert_tokens_to_ids(names)]
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    return dict(zip(names, ids)), style


def response_forks(names, cfg):
    """The forking token of each of the --samples responses: every one in --tag_order (all), one for
    all (<thinkK>), AUTO (chosen per problem by choose_forks), or None for the plain prompt
    (none)."""
    if cfg.fork == "none":
        return [None] * cfg.samples
    if cfg.fork not in ("all", AUTO) and cfg.fork not in names:
        raise SystemExit(f"error: --fork {cfg.fork}: the forking tokens of --model {cfg.model} are "
                         f"{names[0]}..{names[-1]} (or all, auto or none)")
    if cfg.fork != "all":
        return [cfg.fork] * cfg.samples
    if cfg.tag_order == "block":  # token k answers the k-th block (the first ones may be longer)
        return [name for name, count in zip(names, score.fair_split_counts(cfg.samples, len(names)))
                for _ in range(count)]
    return [names[i % len(names)] for i in range(cfg.samples)]


def choose_forks(model, tokenizer, prompt_ids, tag_ids, count, choice, seed, temperature=1.0):
    """--fork auto: (the fork of each of `count` responses, {"fork_policy": {name: pi}}). pi(i | x)
    is the model's distribution over its tags after the prompt, renormalised over them; greedy gives
    every response the most likely tag, sample draws each response's tag from pi at `temperature`
    (the one GFPO trained it at, policy.trained_temperature; seeded)."""
    names = list(tag_ids)
    pad_id = pad_id_of(tokenizer)
    scorer = policy.TagPolicy(model, list(tag_ids.values()), pad_id)
    tag_logits = policy.tag_logits(scorer, [prompt_ids])["tag_logits"]
    logpi = policy.log_policy(tag_logits)
    generator = torch.Generator().manual_seed(seed)
    logpi_t = policy.log_policy(tag_logits, temperature)
    picks = policy.choose_tags(logpi_t, count, choice == "greedy", generator)[0]
    pi = dict(zip(names, logpi[0].exp().tolist()))
    return [names[i] for i in picks.tolist()], {"fork_policy": pi}


# ----------------------------------------------------------------------------- one problem

def solve(model, tokenizer, problem, forks, tag_ids, stop_ids, cfg, seed):
    """One problem -> its output row. Each response's prompt is data.build_text(prompt, tag): the
    prompt tokenised as training did (data.encode_prompt), then the tag's ids. The prompt is the
    shared prefix (a baseline's: all but its last token, which each response starts with)."""
    prompt_ids = data.encode_prompt(tokenizer, problem["prompt"])
    generator = torch.Generator(model.device).manual_seed(seed)
    chosen = {}
    if forks[0] == AUTO:  # the model picks: pi over its N tags after the prompt (policy.py)
        forks, chosen = choose_forks(model, tokenizer, prompt_ids, tag_ids, len(forks),
                                     cfg.auto_choice, seed, policy.trained_temperature(cfg.model))
    if forks[0] is None:  # a baseline: the plain prompt
        prefix, starts = prompt_ids[:-1], [prompt_ids[-1:]] * len(forks)
    else:
        prefix, starts = prompt_ids, [tag_ids[f] for f in forks]
    responses = decoding.generate(model, prefix, starts, cfg.max_new_tokens, cfg.temperature,
                                  cfg.top_p, stop_ids, generator, cfg.batch_size)
    completions = []
    for fork, (ids, finished) in zip(forks, responses):
        text = tokenizer.decode(ids)
        pred, correct = grader.grade(text, problem["gold"], problem["kind"], finished=finished,
                                     question=problem["prompt"])
        completions.append({"fork": fork, "text": text, "pred": pred, "correct": correct,
                            "tokens": len(ids), "finished": finished})
    return {**{k: problem[k] for k in ("id", "prompt", "gold", "kind", "template")},
            "tag_order": cfg.tag_order, **chosen, "completions": completions}


def show_prompts(tokenizer, problem, forks, tag_ids, style, auto_choice="greedy"):
    """Prints the exact prompt of every forking tag for `problem`, and its token ids: a format can
    be checked by eye before any weights load. --fork auto: every tag the model chooses among."""
    if forks[0] == AUTO:
        print(f"--fork auto: the model scores each tag below after the prompt, pi(tag | prompt) = "
              f"softmax over the {len(tag_ids)} tags of log p(tag's tokens | prompt), and "
              + ("every response takes the most likely tag" if auto_choice == "greedy" else
                 "each response draws its tag from pi") + " (the row records pi as fork_policy)")
        forks = list(tag_ids)
    for fork in dict.fromkeys(forks):
        tag = data.fork_tag(fork, style) if fork else ""
        text = data.build_text(tokenizer, problem["prompt"], tag)
        ids = data.encode_prompt(tokenizer, problem["prompt"]) + (tag_ids[fork] if fork else [])
        print(f"----- {fork or 'no forking token'} ({len(ids)} tokens; tag ids "
              f"{tag_ids.get(fork, [])})\n{text}")


# ----------------------------------------------------------------------------- main

def main(cfg):
    from tqdm import tqdm
    # every check before the model loads, on every rank alike; nothing is written before it loads
    records = toy.held_out_records(cfg.limit or 100) if cfg.data == "toy" else None
    problems = evalfiles.load_problems(cfg.data, cfg.instruction, cfg.limit, records)
    name = f"{os.path.splitext(os.path.basename(cfg.data))[0]}.{cfg.fork.strip('<>')}.jsonl"
    output = cfg.output or os.path.join("eval", evalfiles.model_name(cfg.model), name)
    tokenizer = decoding.load_tokenizer(cfg.model)
    tag_ids, style = model_tags(tokenizer, cfg) if cfg.fork != "none" else ({}, None)
    forks = response_forks(list(tag_ids), cfg)
    if cfg.show_prompts:
        return show_prompts(tokenizer, problems[0], forks, tag_ids, style, cfg.auto_choice)
    done = evalfiles.resumable(output, cfg, SAME_ON_RESUME)

    rank, world, device = init_distributed()  # plain python: a world of one
    try:
        streams = cfg.batch_size or cfg.samples
        memory_report.refuse_unless_infer_fits(cfg.model, streams, cfg.max_new_tokens, device)
        model = decoding.load_model(cfg.model, device)
        stop_ids = decoding.stop_ids(tokenizer, model)
        print0(json.dumps(dataclasses.asdict(cfg)))
        if rank == 0:
            os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
            write_json(output.removesuffix(".jsonl") + ".config.json", dataclasses.asdict(cfg))
        todo = [(i, p) for i, p in enumerate(problems) if p["id"] not in done]
        print0(f"{len(problems)} problems, {len(problems) - len(todo)} already in {output}, "
               f"{cfg.samples} responses each, forking tags ({style}, {cfg.tag_order} order): "
               + (f"chosen by the model ({cfg.auto_choice}) among {list(tag_ids)}"
                  if forks[0] == AUTO else
                  f"{[data.fork_tag(f, style) if f else None for f in dict.fromkeys(forks)]}"))

        bar = tqdm(total=len(todo), disable=rank != 0, desc="problems")
        # problems strided over ranks; rank 0 alone writes, so each round's rows are gathered to it
        for start in range(0, len(todo), world):
            mine = todo[start + rank] if start + rank < len(todo) else None
            row = None if mine is None else \
                solve(model, tokenizer, mine[1], forks, tag_ids, stop_ids, cfg, cfg.seed + mine[0])
            rows = [None] * world if rank == 0 else None
            dist.gather_object(row, rows, dst=0)
            if rank == 0:
                for r in filter(None, rows):
                    append_jsonl(output, r)
                bar.update(sum(r is not None for r in rows))
        bar.close()
        if rank == 0:  # the rows of this run's problems, scored
            by_id = {r.get("id"): r for r in evalfiles.read_rows(output)}
            return score.score_rows([by_id[p["id"]] for p in problems], output, cfg.set_size)
    finally:
        close_distributed()


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
