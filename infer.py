"""Parallel reasoning with global forking tokens, majority voting and the paper's metrics (Section 2.3).

Response i of a problem is prompted with <think(i mod N + 1)> and the answers are majority-voted
(Cons@k, Section 2.3). The prompt is data.build_text's, the one training used; the part before the
forking token is prefilled once and its KV cache shared by all the problem's responses. Without
aggregation every response uses the single token of largest coverage (Eq. 6, select_token.py), and
a model without forking tokens (an SFT baseline) samples from the plain prompt, same count and settings.

Metrics (Table 1, Figures 4 and 5) are computed per problem and averaged over problems:
    pass@1         mean correctness of the n responses ("average of 32 generations")
    cons@k         majority vote of the first k responses (k = 2, 4, 8, ... and n)
    pass@k         Chen et al. (2021)'s unbiased 1 - C(n-c, k) / C(n, k), for every k <= n (Figure 4)
    native_cons@N  sets of N responses, the j-th set holding the j-th response of every forking token,
                   majority-voted and averaged over the sets ("Pass@1 of Native Cons@6"; the paper's
                   11 sets of N = 6 take --samples 66); with fewer than 2 forking tokens, consecutive
                   blocks of --set_size responses (the baselines' protocol)
    per_fork       accuracy and mean response length of each forking token (Figure 5)
Votes: answers are grouped by the test that grades them (`is_equiv`); the largest group wins, a tie
goes to the group whose answer appeared first, and responses without a \\boxed{} answer are wrong and
never vote: a set with no parseable answer counts as wrong.

    python infer.py --model out/ssft/final --data toy --samples 8 --max_new_tokens 128 --limit 20
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --max_new_tokens 32768
    python infer.py --model out/ssft/final --data ../shared/data/aime24.jsonl --fork "<think3>"  # Pass@1
    python infer.py --model out/sft/final --data ../shared/data/aime24.jsonl --fork none         # baseline
    torchrun --standalone --nproc_per_node 8 infer.py --model out/ssft/final --data ...          # 8 GPUs
    python infer.py --score eval/aime24.cycle.jsonl   # metrics of an existing file (e.g. from vLLM)

Rows go to --output as each problem finishes; rerunning the same command resumes where it stopped.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
import toy

try:  # optional: a symbolic equivalence test (pip install math-verify)
    from math_verify import parse as mv_parse, verify as mv_verify
except ImportError:
    mv_parse = mv_verify = None


@dataclass
class Config:
    model: str = "out/ssft/final"  # a final/ directory from train.py, or any Hugging Face causal LM
    data: str = "../shared/data/math500.jsonl"  # MATH-500/AIME/AMC/GSM8K/training JSONL, or toy (held out)
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
    score: str = ""  # score this rows JSONL without a model, then exit


SAME_ON_RESUME = ("model", "data", "fork", "samples", "temperature", "top_p", "max_new_tokens",
                  "instruction", "seed")  # rows made with other values must not be mixed in one file


def parse_config(argv=None):
    """One flag per Config field, its trailing comment as the help."""
    comments = dict(re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.M))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name}", type=f.type, default=f.default,
                            help=f"{comments[f.name]} (default: %(default)r)")
    cfg = Config(**vars(parser.parse_args(argv)))
    for name in ("samples", "max_new_tokens", "set_size"):
        if getattr(cfg, name) < 1:
            parser.error(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        parser.error(f"need --temperature >= 0 and 0 < --top_p <= 1 (got {cfg.temperature}, {cfg.top_p})")
    return cfg


# ----------------------------------------------------------------------------- answers

def last_boxed(text):
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    while start >= 0:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try the one before
    return None


def gold_answer(answer):
    """The final answer of a gold field: a last line `#### n` (GSM8K) or `A: n` (its model solutions),
    else the last \\boxed{} in it, else all of it."""
    answer = str(answer).strip()
    last = answer.rsplit("\n", 1)[-1]
    for mark in ("####", "A:"):
        if last.startswith(mark):
            return last[len(mark):].strip().replace(",", "")
    return last_boxed(answer) or answer


def normalise(s):
    """A canonical string for the built-in comparison: no spaces, $, \\left/\\right, \\text{}, units of
    degree or percent, thousands separators or trailing period; \\dfrac and \\tfrac read as \\frac."""
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for a, b in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\dfrac", "\\frac"),
                 ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""),
                 ("$", ""), (" ", "")):
        s = s.replace(a, b)
    s = re.sub(r"(\d),(\d{3})(?!\d)", r"\1\2", s)
    return s.rstrip(".")


def as_number(s):
    """The value of "12", "-0.5", "1/2" or "\\frac{1}{2}" (after normalise), else None."""
    m = re.fullmatch(r"(-?)\\frac\{?(-?[\d.]+)\}?\{?(-?[\d.]+)\}?", s) or re.fullmatch(r"(-?)(-?[\d.]+)/(-?[\d.]+)", s)
    try:
        if m:
            return (-1 if m.group(1) else 1) * float(m.group(2)) / float(m.group(3))
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def is_equiv(pred, ref):
    """Whether answer `pred` equals `ref`: math-verify when installed, else normalised strings or
    numbers equal to 1e-6 relative. The one test behind every metric, votes included."""
    if pred is None or ref is None:
        return False
    if mv_verify is not None:
        gold, target = mv_parse(f"\\boxed{{{ref}}}"), mv_parse(f"\\boxed{{{pred}}}")
        if gold and target:
            return bool(mv_verify(gold, target))
    a, b = normalise(pred), normalise(ref)
    x, y = as_number(a), as_number(b)
    return a == b or (x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6))


# ----------------------------------------------------------------------------- metrics

def pass_at_k(n, c, k):
    """Unbiased pass@k of Chen et al. (2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(completions):
    """Whether the majority answer of `completions` ([{"pred", "correct"}]) is correct. Groups are
    formed in order of first appearance, so max() (first of the largest) breaks ties toward the
    earliest answer; None predictions do not vote, and no vote at all is wrong."""
    groups = []  # [answer, votes, correct]
    for c in completions:
        if c["pred"] is None:
            continue
        for g in groups:
            if is_equiv(c["pred"], g[0]):
                g[1] += 1
                break
        else:
            groups.append([c["pred"], 1, bool(c["correct"])])
    return max(groups, key=lambda g: g[1])[2] if groups else False


def native_sets(completions, set_size):
    """Native Cons@N sets: with >= 2 forking tokens, set j = the j-th response of each token (so each
    set uses every token once, whatever the row order); else consecutive blocks of `set_size`."""
    forks = list(dict.fromkeys(c["fork"] for c in completions if c["fork"]))
    if len(forks) >= 2:
        return [list(s) for s in zip(*[[c for c in completions if c["fork"] == f] for f in forks])]
    return [completions[i:i + set_size] for i in range(0, len(completions) - set_size + 1, set_size)]


def problem_metrics(completions, set_size):
    """{metric: value} of one problem's responses; values in [0, 1]."""
    n, c = len(completions), sum(bool(x["correct"]) for x in completions)
    m = {"pass@1": c / n}
    for k in sorted({2 ** i for i in range(1, n.bit_length())} | {n}):
        m[f"cons@{k}"] = float(majority_vote(completions[:k]))
    m.update({f"pass@{k}": pass_at_k(n, c, k) for k in range(2, n + 1)})
    sets = native_sets(completions, set_size)
    if sets:
        m[f"native_cons@{len(sets[0])}"] = sum(majority_vote(s) for s in sets) / len(sets)
    return m


def aggregate(rows, set_size):
    """Means over problems of the metrics every problem has, plus per-fork accuracy and length."""
    per_problem = [problem_metrics(r["completions"], set_size) for r in rows]
    keys = [k for k in per_problem[0] if all(k in m for m in per_problem)]
    out = {k: sum(m[k] for m in per_problem) / len(rows) for k in keys}
    responses = [c for r in rows for c in r["completions"]]
    out.update(problems=len(rows), responses=len(responses),
               unparseable=sum(c["pred"] is None for c in responses) / len(responses))
    unit = "tokens" if all("tokens" in c for c in responses) else "chars"
    out["per_fork"] = {}
    for fork in dict.fromkeys(c["fork"] or "none" for c in responses):
        mine = [c for c in responses if (c["fork"] or "none") == fork]
        out["per_fork"][fork] = {"responses": len(mine), "accuracy": sum(c["correct"] for c in mine) / len(mine),
                                 f"mean_{unit}": sum(c["tokens"] if unit == "tokens" else len(c["text"])
                                                     for c in mine) / len(mine)}
    return out


def print_table(metrics, title):
    print(f"{title}: {metrics['problems']} problems, {metrics['responses']} responses, "
          f"{100 * metrics['unparseable']:.1f}% without an answer")
    n = max(int(k[5:]) for k in metrics if k.startswith("pass@"))
    shown = [k for k in metrics if k == "pass@1" or k.startswith(("cons@", "native_cons@"))
             or k.startswith("pass@") and int(k[5:]) in {2 ** i for i in range(n.bit_length())} | {n}]
    for k in shown:
        print(f"  {k:<16} {100 * metrics[k]:6.2f}")
    for fork, s in metrics["per_fork"].items():
        length = ", ".join(f"{k[5:]} {v:.0f}" for k, v in s.items() if k.startswith("mean_"))
        print(f"  {fork:<16} {100 * s['accuracy']:6.2f}  ({s['responses']} responses, mean {length})")


# ----------------------------------------------------------------------------- files

def read_jsonl(path, drop_truncated_tail=False):
    """[(line number, object)] of a JSONL file. A malformed line raises DataError naming path:line,
    except, with drop_truncated_tail, an unterminated last line (a run killed mid-write): dropped."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise data.DataError(f"{path}: cannot read ({e.strerror})") from None
    if drop_truncated_tail:
        lines[-1] = b""  # after the last newline: empty, or the unfinished row of a killed run
    out = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise data.DataError(f"{path}:{n}: malformed JSON ({e})") from None
    return out


def load_problems(path, instruction, limit):
    """[{"id", "prompt", "gold"}] of an evaluation file or a training layout: the prompt from prompt,
    problem or question; the gold from answer, ground_truth, gt or solution (data.parse_row's order);
    the id from id, unique_id or idx, else the row's 0-based position."""
    if path == "toy":  # toy.py's task; train.py draws its questions with --seed 0, these with seed 1
        return [{"id": i, "prompt": q["prompt"] + instruction, "gold": q["answer"]}
                for i, q in enumerate(toy.make_questions(100, seed=1))][:limit or None]
    problems, seen = [], set()
    for i, (n, row) in enumerate(read_jsonl(path)):
        row = row if isinstance(row, dict) else {}
        prompt = next((row[k] for k in ("prompt", "problem", "question") if isinstance(row.get(k), str)), "")
        gold = next((row[k] for k in ("answer", "ground_truth", "gt", "solution") if row.get(k) is not None), None)
        pid = row.get("id", row.get("unique_id", row.get("idx", i)))
        if not prompt.strip() or gold is None:
            raise data.DataError(f"{path}:{n}: need a prompt ('prompt', 'problem' or 'question') and a "
                                 "gold answer ('answer', 'ground_truth', 'gt' or 'solution')")
        if pid in seen:
            raise data.DataError(f"{path}:{n}: duplicate id {pid!r}")
        seen.add(pid)
        problems.append({"id": pid, "prompt": prompt + instruction, "gold": gold_answer(gold)})
    if not problems:
        raise data.DataError(f"{path}: no problems")
    return problems[:limit or None]


def read_rows(path):
    """Rows of an output file, with pred and correct filled in from text and gold where missing."""
    rows = []
    for n, row in read_jsonl(path, drop_truncated_tail=True):
        if not isinstance(row, dict) or "gold" not in row or not isinstance(row.get("completions"), list) \
                or not row["completions"] or not all(isinstance(c, dict) and "text" in c for c in row["completions"]):
            raise data.DataError(f"{path}:{n}: a row needs 'gold' and 'completions': [{{'text', ...}}, ...]")
        gold = gold_answer(row["gold"])
        for c in row["completions"]:
            c.setdefault("fork", None)
            if "pred" not in c:
                c["pred"] = last_boxed(c["text"])
            if "correct" not in c:
                c["correct"] = is_equiv(c["pred"], gold)
        rows.append(row)
    return rows


def drop_partial_line(path):
    """Cuts an unfinished last row (a run killed mid-write) so that appended rows start a line."""
    with open(path, "rb+") as f:
        text = f.read()
        if text and not text.endswith(b"\n"):
            f.truncate(text.rfind(b"\n") + 1)


def append_row(path, row):
    """One row, synced to disk before the next problem starts, so a kill loses at most this row."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)  # never a half-written file


# ----------------------------------------------------------------------------- generation

def sample(logits, temperature, top_p, generator):
    """logits: [B, V] -> next token ids [B]. Temperature 0 is greedy; otherwise nucleus sampling from
    the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, order = torch.softmax(logits.float() / temperature, -1).sort(-1, descending=True)
    probs[probs.cumsum(-1) - probs >= top_p] = 0  # the tokens before this one already reach top_p
    return order.gather(-1, torch.multinomial(probs, 1, generator=generator))[:, 0]


@torch.no_grad()
def generate(model, prefix_ids, first_ids, cfg, stop_ids, generator):
    """Responses that share one prompt. prefix_ids: the shared prompt, prefilled once; first_ids: [S]
    each response's first input id (its forking token). Returns S pairs (ids, finished): the new
    tokens, cut before the first stop token, and whether one came within max_new_tokens.

    Responses are decoded cfg.batch_size at a time (all S by default), each batch from a copy of the
    prefilled cache. All rows of a batch have the same length, so no padding or attention mask is
    needed; a row that stops leaves the batch and its cache rows are dropped."""
    device = next(model.parameters()).device
    prefix = model(torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1).cache
    out, chunk = [], cfg.batch_size or len(first_ids)
    for start in range(0, len(first_ids), chunk):
        firsts = first_ids[start:start + chunk]
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(firsts))  # [1, heads, P, dim] -> [len(firsts), heads, P, dim]
        ids, finished = [[] for _ in firsts], [False] * len(firsts)
        live, tokens = list(range(len(firsts))), torch.tensor(firsts, device=device)
        for _ in range(cfg.max_new_tokens):
            logits = model(tokens[:, None], cache=cache, use_cache=True).logits[:, -1]
            tokens = sample(logits, cfg.temperature, cfg.top_p, generator)
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
        out += zip(ids, finished)
    return out


def response_forks(tokenizer, cfg):
    """The forking token of each response: <think1>, ..., <thinkN>, <think1>, ... (cycle), one token
    for all (<thinkK>), or None for the plain prompt (none). SystemExit on a bad --fork."""
    names = sorted(t for t in tokenizer.get_added_vocab() if re.fullmatch(r"<think\d+>", t))
    if cfg.fork == "none":
        return [None] * cfg.samples
    if names != sorted(data.fork_tokens(len(names))):
        raise SystemExit(f"error: --model {cfg.model}: forking tokens {names} are not <think1>..<thinkN>")
    names = data.fork_tokens(len(names))  # in index order
    if cfg.fork == "cycle" and names:
        return [names[i % len(names)] for i in range(cfg.samples)]
    if cfg.fork not in names:
        found = f"{names[0]}..{names[-1]}" if names else "none (use --fork none for a baseline)"
        raise SystemExit(f"error: --fork {cfg.fork}: the forking tokens of --model {cfg.model} are {found}")
    return [cfg.fork] * cfg.samples


def solve(model, tokenizer, problem, forks, cfg, stop_ids, seed):
    """One problem -> its output row. Each response's prompt is data.build_text(prompt, fork); all end
    in one token after a shared prefix (the forking token, or the plain prompt's last token)."""
    texts = [data.build_text(tokenizer, problem["prompt"], f or "") for f in forks]
    encoded = {t: tokenizer.encode(t, add_special_tokens=False) for t in texts}
    prefix = encoded[texts[0]][:-1]
    assert all(e[:-1] == prefix for e in encoded.values()), "a forking token must be one token"
    generator = torch.Generator(model.device).manual_seed(seed)
    responses = generate(model, prefix, [encoded[t][-1] for t in texts], cfg, stop_ids, generator)
    completions = []
    for fork, (ids, finished) in zip(forks, responses):
        text = tokenizer.decode(ids)
        pred = last_boxed(text)
        completions.append({"fork": fork, "text": text, "pred": pred, "correct": is_equiv(pred, problem["gold"]),
                            "tokens": len(ids), "finished": finished})
    return {"id": problem["id"], "prompt": problem["prompt"], "gold": problem["gold"], "completions": completions}


def init_distributed():
    """torchrun sets RANK and WORLD_SIZE; plain `python` is a world of one with no process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def main(cfg):
    if cfg.score:
        rows = read_rows(cfg.score)
        if not rows:
            raise data.DataError(f"{cfg.score}: no rows to score")
        metrics = aggregate(rows, cfg.set_size)
        write_json(cfg.score.removesuffix(".jsonl") + ".metrics.json", metrics)
        print_table(metrics, cfg.score)
        return metrics
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # every check before the model loads, on every rank alike
    problems = load_problems(cfg.data, cfg.instruction, cfg.limit)
    name = os.path.splitext(os.path.basename(cfg.data))[0]
    output = cfg.output or os.path.join("eval", f"{name}.{cfg.fork.strip('<>')}.jsonl")
    base = output.removesuffix(".jsonl")
    if os.path.exists(base + ".config.json"):
        with open(base + ".config.json") as f:
            old = json.load(f)
        changed = [f"--{k} {old.get(k)!r}" for k in SAME_ON_RESUME if old.get(k) != getattr(cfg, k)]
        if changed:
            raise SystemExit(f"error: {output} holds rows made with {', '.join(changed)}: "
                             "pass the same values to resume, or a new --output")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    forks = response_forks(tokenizer, cfg)

    rank, world, device = init_distributed()
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg)))
        os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
        if os.path.exists(output):
            drop_partial_line(output)
        write_json(base + ".config.json", dataclasses.asdict(cfg))
    if world > 1:
        dist.barrier()
    done = {r["id"] for r in read_rows(output)} if os.path.exists(output) else set()
    todo = [(i, p) for i, p in enumerate(problems) if p["id"] not in done]
    # bf16 as trained on GPUs; fp32 on CPU
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    eos = model.generation_config.eos_token_id
    stop_ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
    if rank == 0:
        print(f"{len(problems)} problems, {len(problems) - len(todo)} already in {output}, "
              f"{cfg.samples} responses each, forking tokens: {list(dict.fromkeys(forks))}")

    bar = tqdm(total=len(todo), disable=rank != 0, desc="problems")
    # problems strided over ranks; rank 0 alone writes, so each round's rows are gathered to it
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else None
        row = solve(model, tokenizer, mine[1], forks, cfg, stop_ids, cfg.seed + mine[0]) if mine else None
        rows = [row]
        if world > 1:
            rows = [None] * world if rank == 0 else None
            dist.gather_object(row, rows, dst=0)
        if rank == 0:
            for r in filter(None, rows):
                append_row(output, r)
            bar.update(sum(r is not None for r in rows))
    bar.close()

    if rank == 0:
        by_id = {r["id"]: r for r in read_rows(output)}
        metrics = aggregate([by_id[p["id"]] for p in problems], cfg.set_size)
        write_json(base + ".metrics.json", metrics)
        print_table(metrics, output)
    if world > 1:
        dist.destroy_process_group()
    return metrics if rank == 0 else None


if __name__ == "__main__":
    try:
        main(parse_config())
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
