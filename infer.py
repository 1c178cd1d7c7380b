"""Parallel reasoning with global forking tokens (Section 2.3): one response per tag, then a vote.

Each response of a problem is prompted with one forking tag after the prompt, <think1> .. <thinkN>
in turn, and its answer joins the vote (Cons@k: score.py, whose default vote infer.py prints).
Without aggregation every response takes one tag: the token of largest coverage (--fork <thinkK>,
Eq. 6: select_token.py), or the tag the model itself chooses after the prompt (--fork auto:
policy.py's pi, trained by gfpo.py). A model without forking tokens (an SFT baseline) samples from
the plain prompt (--fork none). The prompt is the one training used (data.build_text), prefilled
once for all the problem's responses (plumbing/decoding.py). Evaluation files get the paper's
prompts (LightEval's), training layouts and the toy theirs as trained; --protocol official prompts
the authors' released checkpoint their way (plumbing/evalfiles.py, docs/reproducing.md).

    python infer.py --model out/ssft/final --data toy --samples 16 --max_new_tokens 64  # the toy
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl           # Cons@k
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --fork "<think3>"
    python infer.py --model out/sft/final --data ../shared/data/aime24.jsonl --fork none  # baseline
    python infer.py --model out/gfpo/final --data toy --fork auto --max_new_tokens 64      # own tag
    python infer.py --model out/ssft/final --data ../shared/data/math500.jsonl --show_prompts
    torchrun --standalone --nproc_per_node 8 infer.py --model out/ssft/final --data ...    # 8 GPUs

Rows go to --output as each problem finishes; rerunning the same command resumes where it stopped.
"""
from dataclasses import dataclass

import torch

import data
import policy
import score
import toy
from plumbing import decoding, evalfiles, grader, inferrun, memory_report
from plumbing.batching import pad_id_of
from plumbing.files import DataError, model_problem
from plumbing.flags import check, parse_flags
from plumbing.ranks import close_distributed, init_distributed


@dataclass
class Config:
    model: str = "out/ssft/final"  # a final/ directory from train.py, or any Hugging Face causal LM
    data: str = "../shared/data/math500.jsonl"  # evaluation or training JSONL/Parquet, or toy
    output: str = ""  # rows JSONL ('' = eval/<model name>/<data name>.<fork>.jsonl), metrics beside
    fork: str = "all"  # all (in --tag_order) | <thinkK> for all | none (plain prompt) | auto
    auto_choice: str = "greedy"  # --fork auto: greedy (every response the most likely tag) | sample
    tag_order: str = "cycle"  # cycle: response i gets token i mod N; block: token k the k-th block
    fork_style: str = "auto"  # special | text (data.py) | auto: the model's (final/ssft.json)
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
    cfg = Config(**{**evalfiles.official_preset(given, Config.data), **given})  # given flags win
    check(parser, cfg, RULES, [model_problem(cfg.model)])
    return cfg


# ----------------------------------------------------------------------------- the tags

def model_tags(tokenizer, cfg):
    """({name: token ids of its tag} of the model's forking tokens <think1>..<thinkN>, the style).
    The style and N come from the flags, else from the model (inferrun.tag_style). SystemExit naming
    the flag when they cannot be found."""
    style, n = inferrun.tag_style(cfg, data.count_fork_tokens(tokenizer))
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
        counts = evalfiles.fair_split_counts(cfg.samples, len(names))
        return [name for name, count in zip(names, counts) for _ in range(count)]
    return [names[i % len(names)] for i in range(cfg.samples)]


def choose_forks(model, tokenizer, prompt_ids, tag_ids, count, choice, seed, temperature=1.0):
    """--fork auto: (the fork of each of `count` responses, {"fork_policy": {name: pi}}). pi(i | x)
    is the model's distribution over its tags after the prompt, renormalised over them; greedy gives
    every response the most likely tag, sample draws each response's tag from pi at `temperature`
    (the one GFPO trained it at, inferrun.trained_temperature; seeded)."""
    names = list(tag_ids)
    scorer = policy.TagPolicy(model, list(tag_ids.values()), pad_id_of(tokenizer))
    tag_logits = policy.tag_logits(scorer, [prompt_ids])["tag_logits"]
    picks = policy.choose_tags(policy.log_policy(tag_logits, temperature), count,
                               choice == "greedy", torch.Generator().manual_seed(seed))[0]
    pi = policy.log_policy(tag_logits)[0].exp().tolist()
    return [names[i] for i in picks.tolist()], {"fork_policy": dict(zip(names, pi))}


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
                                     cfg.auto_choice, seed, inferrun.trained_temperature(cfg.model))
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
        print(inferrun.auto_note(len(tag_ids), auto_choice))
        forks = list(tag_ids)
    for fork in dict.fromkeys(forks):
        tag = data.fork_tag(fork, style) if fork else ""
        text = data.build_text(tokenizer, problem["prompt"], tag)
        ids = data.encode_prompt(tokenizer, problem["prompt"]) + (tag_ids[fork] if fork else [])
        print(f"----- {fork or 'no forking token'} ({len(ids)} tokens; tag ids "
              f"{tag_ids.get(fork, [])})\n{text}")


# ----------------------------------------------------------------------------- main

def main(cfg):
    # every check before the model loads, on every rank alike; nothing is written before it loads
    records = toy.held_out_records(cfg.limit or 100) if cfg.data == "toy" else None
    problems = evalfiles.load_problems(cfg.data, cfg.instruction, cfg.limit, records)
    output = inferrun.output_path(cfg)
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
        todo = [(i, p) for i, p in enumerate(problems) if p["id"] not in done]
        tags = [data.fork_tag(f, style) if f else None for f in dict.fromkeys(forks)]
        inferrun.start(cfg, problems, todo, output, style, tags, list(tag_ids), rank)
        inferrun.solve_all(todo, lambda i, problem: solve(model, tokenizer, problem, forks, tag_ids,
                                                          stop_ids, cfg, cfg.seed + i),
                           output, rank, world)
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
