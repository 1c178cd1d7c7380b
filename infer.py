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
import grader
import match
import memory
import policy
import score
import toy
from common import (DataError, append_jsonl, changed_settings, close_distributed, init_distributed, parse_flags,
                    print0, read_json, read_jsonl, write_json)


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
MATH_TEMPLATE = ("Solve the following math problem efficiently and clearly.  The last line of your response should "
                 "be of the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is "
                 "correct' (without quotes) where ANSWER is just the final number or expression that solves the "
                 "problem. Think step by step before answering.\n\n{question}")
CHOICE_TEMPLATE = ("Answer the following multiple choice question. The last line of your response should be of the "
                   "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
                   "step before answering.\n\n{question}")
OFFICIAL = dict(tag_order="block", instruction="auto", temperature=0.7, top_p=0.95, max_new_tokens=32768)
OFFICIAL_TAGS = ("text", 6)  # --protocol official's tags, where the model has no ssft.json to say otherwise
AUTO = "auto"  # the fork of a response whose tag the model chooses (--fork auto)
CHOICE_SEED = 1234  # LightEval's: one generator, one draw per GPQA problem in file order, places the gold


def official_samples(data_path, fork):
    """The authors' sample counts: 32 of one token for Pass@1, else 11 per token on AIME, 6 elsewhere."""
    return 32 if fork != "all" else 66 if "aime" in os.path.basename(data_path).lower() else 36


def parse_config(argv=None):
    parser, given = parse_flags(Config, __doc__, argv)
    preset = {}
    if given.get("protocol") == "official":
        preset = {**OFFICIAL, "samples": official_samples(given.get("data", Config.data), given.get("fork", "all"))}
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

def template(instruction, kind, plain):
    """The prompt template of a problem: --instruction auto gives LightEval's prompt for an evaluation
    problem (math or multiple choice) and the question as it is for a training layout or the toy
    (`plain`: the model was trained on it that way); none: as it is; any other text is a template
    holding {question}, or is appended to the question."""
    if instruction == "auto":
        return "{question}" if plain else CHOICE_TEMPLATE if kind == "choice" else MATH_TEMPLATE
    if instruction == "none":
        return "{question}"
    return instruction if "{question}" in instruction else "{question}" + instruction


def choice_problem(row, rng, where):
    """(question text with its lettered choices, gold letter) of a multiple-choice row: GPQA's columns
    (Question, Correct Answer, Incorrect Answer 1-3; the gold's place drawn from `rng` as LightEval
    does) or {"question", "choices": [4], "answer": letter or index}."""
    if "Correct Answer" in row:
        choices = [row.get(f"Incorrect Answer {k}") for k in (1, 2, 3)]
        gold = rng.randint(0, 3)
        choices.insert(gold, row["Correct Answer"])
        question = row.get("Question")
    else:
        choices, question, gold = row.get("choices"), row.get("question", row.get("prompt")), row.get("answer")
        gold = "ABCD".index(gold.strip().upper()) if isinstance(gold, str) and gold.strip().upper() in list("ABCD") \
            else gold
    if not isinstance(question, str) or not isinstance(choices, list) or len(choices) != 4 \
            or not all(isinstance(c, str) for c in choices) or gold not in range(4) or isinstance(gold, bool):
        raise DataError(f"{where}: a multiple-choice row needs a question, 4 choices and the answer (A-D or 0-3)")
    return question + "\n\n" + "\n".join(f"{letter}) {c}" for letter, c in zip("ABCD", choices)), "ABCD"[gold]


def user_message(messages, where):
    """The content of the last user message of a chat-message list (DAPO-Math-17k's `prompt`)."""
    texts = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not texts or not isinstance(texts[-1], str):
        raise DataError(f"{where}: a 'prompt' list needs a user message with text content")
    return texts[-1]


def load_problems(path, instruction="auto", limit=0):
    """[{"id", "prompt", "gold", "kind", "template"}] of an evaluation file, a training layout or the toy:
    the question from prompt, problem or question (or a multiple-choice row, kind "choice"); the gold
    from data.GOLD_FIELDS (DAPO-Math-17k: `prompt` a list of chat messages, whose last user message is
    the question, as it is, with its own answer instruction; the gold reward_model.ground_truth); the id from id, unique_id, idx or Record ID, else the row's 0-based
    position (a null counts as absent). The prompt is the question in its template."""
    if path == "toy":  # toy.py's held-out questions
        rows = [(f"toy:{i + 1}", {"prompt": q["prompt"], "answer": q["answer"], "id": i})
                for i, q in enumerate(toy.held_out_questions(limit or 100))]
    else:
        rows = data.read_records(path)
    problems, seen, rng = [], set(), random.Random(CHOICE_SEED)
    for i, (where, row) in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        dapo = isinstance(row.get("prompt"), list)  # DAPO-Math-17k: chat messages, reward_model.ground_truth
        if dapo:
            reward_model = row.get("reward_model")
            row = {**row, "prompt": user_message(row["prompt"], where),
                   "answer": reward_model.get("ground_truth") if isinstance(reward_model, dict) else None}
        pid = data.first(row, "id", "unique_id", "idx", "Record ID")
        pid = i if pid is None else pid
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(f"{where}: an id must be a string or an integer, got {json.dumps(pid)}")
        if pid in seen:
            raise DataError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        kind = "choice" if data.first(row, "Correct Answer", "choices") is not None else "math"
        if kind == "choice":
            question, gold = choice_problem(row, rng, where)
        else:
            question = next((row[k] for k in ("prompt", "problem", "question") if isinstance(row.get(k), str)), "")
            gold = data.first(row, *data.GOLD_FIELDS)
            if not question.strip() or gold is None or not str(gold).strip():
                raise DataError(f"{where}: need a prompt ('prompt', 'problem' or 'question') and a gold "
                                "answer ('answer', 'ground_truth', 'gt' or 'solution')")
            gold = grader.gold_answer(gold)
        plain = path == "toy" or dapo or data.first(row, "traces", "response") is not None \
            or any(k.endswith("_thinking_trajectory") for k in row)
        form = template(instruction, kind, plain)
        problems.append({"id": pid, "prompt": form.replace("{question}", question), "gold": gold, "kind": kind,
                         "template": form})
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems[:limit or None]


def response_tags(tokenizer, cfg):
    """(fork name per response, the token ids of each name's tag, the style). Names are <thinkK>
    (data.fork_tokens) in --tag_order, or None for the plain prompt (--fork none). The style and N
    come from the flags, else from the model: final/ssft.json, else its reserved tokens.
    SystemExit naming the flag when they cannot be found."""
    if cfg.fork == "none":
        return [None] * cfg.samples, {}, None
    saved = os.path.join(cfg.model, "ssft.json")
    saved = read_json(saved) if os.path.isfile(saved) else {}
    default_style, default_n = OFFICIAL_TAGS if cfg.protocol == "official" else ("special", 0)
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
def generate(model, prefix_ids, starts, max_new_tokens, temperature, top_p, stop_ids, generator, batch_size=0):
    """Responses that share one prompt. prefix_ids: the shared prompt, prefilled once; starts: [S]
    each response's forced first tokens (its forking tag: one reserved token, or a text tag's
    tokens; tags may differ in length). Returns S pairs (ids, finished): the new tokens after the
    tag, cut before the first stop token, and whether one came within max_new_tokens.

    Responses are decoded batch_size at a time (0: all S at once), each batch from a copy of the
    prefilled cache. Every row advances one token per forward, a row still in its tag taking the
    tag's next token instead of a sampled one, so all rows have the same length: no padding or
    attention mask is needed. A row that stops leaves the batch and its cache rows are dropped."""
    device, kv = next(model.parameters()).device, cache_keyword(model)
    out = model(torch.tensor([prefix_ids], device=device), use_cache=True, logits_to_keep=1)
    prefix = out["cache"] if "cache" in out else out["past_key_values"]
    result, chunk = [], batch_size or len(starts)
    for first in range(0, len(starts), chunk):
        forced = [list(s) for s in starts[first:first + chunk]]
        cache = copy.deepcopy(prefix)
        cache.batch_repeat_interleave(len(forced))  # [1, heads, P, dim] -> [rows, heads, P, dim]
        ids, finished = [[] for _ in forced], [False] * len(forced)
        live, tokens = list(range(len(forced))), torch.tensor([f[0] for f in forced], device=device)
        for step in range(1, max(map(len, forced)) + max_new_tokens):
            logits = model(tokens[:, None], use_cache=True, **{kv: cache}).logits[:, -1]
            sampled, keep, nxt = sample(logits, temperature, top_p, generator).tolist(), [], []
            for j, (row, t) in enumerate(zip(live, sampled)):
                if step < len(forced[row]):  # still inside the tag
                    t = forced[row][step]
                elif t in stop_ids:
                    finished[row] = True
                    continue
                else:
                    ids[row].append(t)
                    if len(ids[row]) == max_new_tokens:
                        continue
                keep.append(j)
                nxt.append(t)
            if not keep:
                break
            if len(keep) < len(live):
                cache.batch_select_indices(torch.tensor(keep, device=device))
                live = [live[j] for j in keep]
            tokens = torch.tensor(nxt, device=device)
        result += zip(ids, finished)
    return result


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
    responses = generate(model, prefix, starts, cfg.max_new_tokens, cfg.temperature, cfg.top_p, stop_ids, generator,
                         cfg.batch_size)
    completions = []
    for fork, (ids, finished) in zip(forks, responses):
        text = tokenizer.decode(ids)
        pred, correct = grader.grade(text, problem["gold"], problem["kind"])
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


def model_name(model):
    """The folder of a model's rows under eval/: out/ssft/final -> ssft, Qwen/Qwen2.5-32B -> Qwen2.5-32B, so
    that two models scored on the same file never share (or refuse to resume) a rows file."""
    parts = [p for p in os.path.normpath(model).split(os.sep) if p not in ("", ".", "..")]
    return (parts[-2] if len(parts) > 1 and parts[-1] == "final" else parts[-1]) if parts else "model"


def main(cfg):
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # every check before the model loads, on every rank alike; nothing is written before it loads
    problems = load_problems(cfg.data, cfg.instruction, cfg.limit)
    name = os.path.splitext(os.path.basename(cfg.data))[0]
    output = cfg.output or os.path.join("eval", model_name(cfg.model), f"{name}.{cfg.fork.strip('<>')}.jsonl")
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
            by_id = {r.get("id"): r for r in score.read_rows(output)}
            metrics = score.score_rows([by_id[p["id"]] for p in problems], output, cfg.set_size)
        return metrics
    finally:
        close_distributed()


if __name__ == "__main__":
    try:
        main(parse_config())
    except DataError as e:
        raise SystemExit(f"error: {e}")
