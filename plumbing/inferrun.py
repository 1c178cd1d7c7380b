"""infer.py's run around its method: where the rows go, which tag style and how many tags a model has,
the line printed before the first problem, and the loop that strides the problems over the ranks and
has rank 0 append each finished row to the rows file (so that a rerun resumes where it stopped).
"""
import dataclasses
import json
import os

import torch.distributed as dist

from plumbing import evalfiles
from plumbing.files import append_jsonl, read_json, write_json
from plumbing.ranks import print0

BASELINE_HINT = ("--fork none samples it from the plain prompt, a baseline; a model trained on text tags "
                 "(the authors' released checkpoint) takes --fork_style text --num_forks N, or --protocol "
                 "official")


def output_path(cfg):
    """--output, else eval/<model name>/<data name>.<fork>.jsonl: two models never share a file."""
    name = f"{os.path.splitext(os.path.basename(cfg.data))[0]}.{cfg.fork.strip('<>')}.jsonl"
    return cfg.output or os.path.join("eval", evalfiles.model_name(cfg.model), name)


def tag_style(cfg, reserved):
    """(the tag style, N) of --model: from the flags, else its final/ssft.json, else its `reserved`
    forking tokens (data.count_fork_tokens), else the official protocol's. SystemExit naming the flag
    to give when the model holds no forking tokens, or fewer than asked."""
    saved = os.path.join(cfg.model, "ssft.json")
    saved = read_json(saved) if os.path.isfile(saved) else {}
    default_style, default_n = evalfiles.OFFICIAL_TAGS if cfg.protocol == "official" else ("special", 0)
    style = cfg.fork_style if cfg.fork_style != "auto" else saved.get("fork_style", default_style)
    n = cfg.num_forks or saved.get("num_forks") or (reserved if style == "special" else default_n)
    if style == "special" and not n:
        raise SystemExit(f"error: --model {cfg.model} holds no forking tokens: {BASELINE_HINT}")
    if style == "special" and n > reserved:
        raise SystemExit(f"error: --model {cfg.model} holds {reserved} reserved forking tokens, not {n}")
    if not n:
        raise SystemExit("error: --fork_style text needs --num_forks N (the model has no ssft.json to tell it)")
    return style, n


def trained_temperature(model_dir):
    """The temperature pi was trained at: final/ssft.json's "fork_temperature" (written by gfpo.py),
    1.0 for a model GFPO never trained. infer.py --fork auto --auto_choice sample draws at it."""
    path = os.path.join(model_dir, "ssft.json")
    return float((read_json(path) if os.path.isfile(path) else {}).get("fork_temperature", 1.0))


def start(cfg, problems, todo, output, style, tags, names, rank):
    """Once the model has loaded: prints the flags and what is to run, and (rank 0) writes them beside
    the rows, <output>.config.json. todo: the problems not yet in `output`; tags: the text of each
    distinct tag the responses take (None: the plain prompt); names: the model's forking tokens,
    among which --fork auto chooses."""
    print0(json.dumps(dataclasses.asdict(cfg)))
    if rank == 0:
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        write_json(output.removesuffix(".jsonl") + ".config.json", dataclasses.asdict(cfg))
    print0(f"{len(problems)} problems, {len(problems) - len(todo)} already in {output}, {cfg.samples} "
           f"responses each, forking tags ({style}, {cfg.tag_order} order): "
           + (f"chosen by the model ({cfg.auto_choice}) among {names}" if cfg.fork == "auto" else f"{tags}"))


def auto_note(num_tags, auto_choice):
    """What --show_prompts says of --fork auto before the prompts of the tags it chooses among."""
    return (f"--fork auto: the model scores each tag below after the prompt, pi(tag | prompt) = softmax "
            f"over the {num_tags} tags of log p(tag's tokens | prompt), and "
            + ("every response takes the most likely tag" if auto_choice == "greedy" else
               "each response draws its tag from pi") + " (the row records pi as fork_policy)")


def solve_all(todo, solve, output, rank, world):
    """Runs solve(index, problem) -> row for every (index, problem) of `todo`, strided over the ranks;
    rank 0 alone writes, appending each round's rows to `output` as they finish (a progress bar on
    rank 0)."""
    from tqdm import tqdm
    bar = tqdm(total=len(todo), disable=rank != 0, desc="problems")
    for first in range(0, len(todo), world):  # a round: one problem a rank
        mine = todo[first + rank] if first + rank < len(todo) else None
        row = None if mine is None else solve(*mine)
        rows = [None] * world if rank == 0 else None
        dist.gather_object(row, rows, dst=0)
        if rank == 0:
            for r in filter(None, rows):
                append_jsonl(output, r)
            bar.update(sum(r is not None for r in rows))
    bar.close()
