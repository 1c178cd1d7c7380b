"""From files to token tensors: multi-target data, global forking tokens, batching (Appendix A.1).

A question has one prompt x and M reasoning traces y_1..y_M (M varies per question). Every
training sequence is (prompt, forking tag g_i, trace), built by one function, `build_text`:

    chat_template(user: prompt, add_generation_prompt=True) + tag(i) + trace + eos

The tag has two styles (--fork_style), both a "special token (or a sequence of tokens) g that
initiates reasoning" (Section 2):
    special  "<think{i}>", one reserved token added to the vocabulary (the default)
    text     "<|im_start|><think{i}>\\n" as ordinary text, nothing added: the format of the authors'
             released checkpoint and evaluation code
For a Qwen2.5 tokenizer and the special style that is exactly

    <|im_start|>system\\nYou are Qwen, ...<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n<think3>{trace}<|im_end|>

(newlines shown as \\n; no space around the tag). A tokenizer without a chat template falls back to
"Question: {prompt}\\nAnswer: ". Only trace tokens (and the closing eos) carry loss; the tag's
tokens are prompt.

Rows of a JSONL file may use any of these layouts, detected per row:
    canonical  {"prompt": str, "traces": [str, ...], "answer": str?, "sources": [str, ...]?}
    s1K-1.1    {"question": str, "<teacher>_thinking_trajectory": str, "<teacher>_attempt": str, ...}
               one trace per teacher: trajectory + "\\n</think>\\n\\n" + attempt, source = teacher
    sampled    {"question": str, "response": [str, ...], "score": [bool, ...]}: correct ones kept

Files are JSONL or Parquet (by extension; the hub publishes s1K-1.1 as Parquet). The paper's
pool-to-mixed recipe (Appendix A.3.1) builds a multi-target file from per-teacher files (`mix`).

    python data.py --data ../shared/data/math_cot_100x8.jsonl --model toy  # check a file, print statistics
    python data.py mix --pool gpt_oss.jsonl s1k.parquet claude.jsonl --traces 4 --per_source 2 \\
        --correct_only --seed 0 --out s1k_4mixed.jsonl                     # s1k-4mixed-reasoning
"""
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from common import DataError, parse_flags, read_jsonl, regular_file, write_jsonl

FORK_TOKEN = "<think{}>"  # <think1> ... <thinkN>: the global forking tokens g_1..g_N
TEXT_TAG = "<|im_start|>{}\n"  # --fork_style text: the tag around a token's name, as plain text
FORK_STYLES = ("special", "text")
FALLBACK_PROMPT = "Question: {}\nAnswer: "
GOLD_FIELDS = ("answer", "ground_truth", "gt", "solution")  # where a row's gold answer is, first found wins
IGNORE = -100  # label of tokens that carry no loss


def fork_tokens(num_forks):
    return [FORK_TOKEN.format(i + 1) for i in range(num_forks)]


def fork_tag(name, style):
    """The text of forking token `name` ("<think3>") in a style: "<think3>" or "<|im_start|><think3>\\n"."""
    return TEXT_TAG.format(name) if style == "text" else name


def count_fork_tokens(tokenizer):
    """N of a tokenizer that holds <think1>..<thinkN> (0 for one without forking tokens)."""
    added, n = tokenizer.get_added_vocab(), 0
    while FORK_TOKEN.format(n + 1) in added:
        n += 1
    return n


# ----------------------------------------------------------------------------- reading files

def parse_row(row, where):
    """One JSON object -> {"prompt", "traces", "sources", "answer"}, or None for a sampled row with
    no correct response; raises DataError at `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    prompt = first(row, "prompt", "question")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: no prompt (a non-empty 'prompt' or 'question' string)")
    teachers = sorted(k[:-len("_thinking_trajectory")] for k in row if k.endswith("_thinking_trajectory"))
    if row.get("traces") is not None:
        traces, sources = row["traces"], row.get("sources")
    elif teachers:  # s1K-1.1
        traces, sources = [], []
        for t in teachers:
            thinking, attempt = row.get(f"{t}_thinking_trajectory"), row.get(f"{t}_attempt")
            if isinstance(thinking, str) and thinking.strip():
                traces.append(thinking.strip() + "\n</think>\n\n" + (attempt or "").strip())
                sources.append(t)
    elif row.get("response") is not None:  # sampled responses with correctness scores
        responses, scores = row["response"], row.get("score")
        if not isinstance(responses, list) or not isinstance(scores, list) or len(scores) != len(responses):
            raise DataError(f"{where}: 'response' and 'score' must be lists of the same length")
        traces = [r for r, ok in zip(responses, scores) if ok]
        sources = None
        if not traces:
            return None  # no correct response: nothing to learn from, skipped by load_questions
    else:
        raise DataError(f"{where}: no traces (expected 'traces', '<teacher>_thinking_trajectory' "
                        "or 'response' + 'score')")
    if not isinstance(traces, list) or not all(isinstance(t, str) for t in traces):
        raise DataError(f"{where}: 'traces' must be a list of strings")
    if not any(t.strip() for t in traces):
        raise DataError(f"{where}: no non-empty trace")
    if any(not t.strip() for t in traces):
        raise DataError(f"{where}: an empty trace")
    if sources is not None and (not isinstance(sources, list) or len(sources) != len(traces)):
        raise DataError(f"{where}: 'sources' must be a list with one name per trace "
                        f"({len(traces)} traces)")
    answer = first(row, *GOLD_FIELDS)
    return {"prompt": prompt, "traces": traces, "sources": [str(s) for s in sources] if sources else None,
            "answer": None if answer is None else str(answer)}


def first(row, *keys):
    """The value of the first of `keys` that `row` holds and is not null (Parquet columns hold nulls
    where JSONL rows leave a key out), else None."""
    return next((row[k] for k in keys if row.get(k) is not None), None)


def read_records(path):
    """[(where, row)] of a data file, by its extension: Parquet (the hub's format, e.g. s1K-1.1; where =
    "path:row N") or JSONL (where = "path:line"). DataError naming the file for one that cannot be read."""
    if not path.endswith(".parquet"):
        return [(f"{path}:{n}", row) for n, row in read_jsonl(path)]
    regular_file(path)
    if not os.path.exists(path):  # not "cannot read as Parquet": the file is not there at all
        raise DataError(f"{path}: cannot read (No such file or directory)")
    import pyarrow  # here: only Parquet files need it
    import pyarrow.parquet
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(f"{path}: cannot read as Parquet ({str(e).splitlines()[0]})") from None
    return [(f"{path}:row {n}", row) for n, row in enumerate(rows, start=1)]


def load_questions(path):
    """All questions of a JSONL or Parquet file. Any bad row raises DataError naming it."""
    questions, skipped = [], 0
    for where, row in read_records(path):
        q = parse_row(row, where)
        skipped += q is None
        questions += [{**q, "where": where}] if q else []  # for errors found later
    if skipped:
        print(f"{path}: skipped {skipped} rows with no correct response")
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


# ----------------------------------------------------------------------------- forking tokens

def fork_ids(tokenizer, num_forks, style="special"):
    """The token ids of each forking tag, [[ids of g_1], ..., [ids of g_N]]: one reserved special
    token each (added to the tokenizer by add_fork_tokens), or for style "text" the ordinary tokens
    of "<|im_start|><think{i}>\\n" (nothing added; for Qwen2.5 and i < 10 the 5 tokens <|im_start|>,
    <th, ink, i, >\\n). DataError when the tokenizer cannot express the style."""
    if style == "special":
        return [[i] for i in add_fork_tokens(tokenizer, num_forks)]
    if style != "text":
        raise DataError(f"--fork_style must be one of {', '.join(FORK_STYLES)} (got {style!r})")
    start = tokenizer.encode("<|im_start|>", add_special_tokens=False)
    if len(start) != 1 or start[0] == tokenizer.unk_token_id:
        raise DataError("--fork_style text needs a ChatML tokenizer, in which <|im_start|> is one token (Qwen2.5)")
    return [tokenizer.encode(fork_tag(name, "text"), add_special_tokens=False) for name in fork_tokens(num_forks)]


def add_fork_tokens(tokenizer, num_forks):
    """Registers <think1>..<thinkN> as special tokens (never split, kept by save_pretrained).
    Returns their ids. A string that is already in the vocabulary keeps its id."""
    names = fork_tokens(num_forks)
    tokenizer.add_special_tokens({"additional_special_tokens": names}, replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(names)
    for name, i in zip(names, ids):
        assert tokenizer.encode(name, add_special_tokens=False) == [i], f"{name} is not one token"
    return ids


def init_fork_rows(model, fork_ids, num_trained, seed):
    """Makes room for the forking tokens and initialises their embedding rows.

    Qwen2.5 checkpoints carry spare rows (152064 rows for a ~151665-token tokenizer): we use them
    and keep the checkpoint's shapes, since a resized vocabulary breaks serving engines that read
    the shapes from the config. Only when the ids do not fit is the embedding resized (to a multiple
    of 64). The rows (input and, if untied, output) start at the mean of the first `num_trained`
    rows, which keeps them in-distribution, plus a tiny seeded noise so that the N tokens are not
    exactly equal and the first matchings are not decided by tie-breaking.
    """
    if max(fork_ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(max(fork_ids) + 1, pad_to_multiple_of=64, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for emb in [inputs] if outputs is inputs else [inputs, outputs]:  # tied: one matrix
            trained = emb[:num_trained].float()
            noise = torch.randn(len(fork_ids), emb.shape[1], generator=g) * trained.std() * 1e-2
            emb[fork_ids] = (trained.mean(0) + noise).to(emb.dtype)


# ----------------------------------------------------------------------------- text and tokens

def prompt_text(tokenizer, prompt):
    """Everything before the forking token."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return FALLBACK_PROMPT.format(prompt)


def encode_prompt(tokenizer, prompt):
    """Token ids of prompt_text, the template's own rendering (a template that trims the message, as
    Llama 3 and Qwen3.5 do, drops a trailing newline here too), with the user's prompt tokenised as
    text: a "<think1>" or "<|im_end|>" typed in a question stays plain text, and control tokens come
    only from the chat template and the forking token. For an ordinary prompt the ids equal those of
    prompt_text; a template that changes more than the message is tokenised whole."""
    text, marker = prompt_text(tokenizer, prompt), "\x00PROMPT\x00"
    pieces = prompt_text(tokenizer, marker).split(marker)
    if len(pieces) != 2 or not (text.startswith(pieces[0]) and text.endswith(pieces[1])) \
            or len(pieces[0]) + len(pieces[1]) > len(text):
        return tokenizer.encode(text, add_special_tokens=False)
    head, tail = pieces
    return (tokenizer.encode(head, add_special_tokens=False)
            + tokenizer.encode(text[len(head):len(text) - len(tail)], add_special_tokens=False, split_special_tokens=True)
            + tokenizer.encode(tail, add_special_tokens=False))


def build_text(tokenizer, prompt, tag, trace=""):
    """The one string of (prompt, forking tag, trace) used by training, matching and inference; tag
    is fork_tag's text. With trace="" it is the inference prompt; a training trace ends with eos."""
    return prompt_text(tokenizer, prompt) + tag + (trace + tokenizer.eos_token if trace else "")


def encode_question(tokenizer, q, max_len, tag_len=1, layout="batch"):
    """Token ids of one question: {"prompt_ids", "trace_ids": [...], "truncated": int}.

    Tokenising the prompt, the tag and each trace apart gives the ids of `build_text`'s string
    (the tokenizer splits at a special token, and a text tag ends in a newline), and lets a
    question's M traces share one tokenised prompt. Traces are cut so that prompt + tag + trace <=
    max_len tokens, for tags of up to `tag_len` tokens; under the concat layout so that the whole
    row, prompt + M x (tag + trace), fits max_len (concat_room: the room is shared out evenly).
    """
    prompt_ids = encode_prompt(tokenizer, q["prompt"])
    room = max_len - len(prompt_ids) - tag_len
    if room < 1:
        raise DataError(f"{q.get('where', 'a question')}: a prompt of {len(prompt_ids)} tokens leaves no room "
                        f"for a trace under --max_len {max_len}: {q['prompt'][:60]!r}")
    trace_ids, truncated = [], 0
    for t in q["traces"]:  # a literal "<think1>" or "<|im_end|>" inside a trace stays plain text
        ids = tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True) + [tokenizer.eos_token_id]
        trace_ids.append(ids)
    rooms = [room] * len(trace_ids) if layout == "batch" else \
        concat_room([len(t) for t in trace_ids], max_len - len(prompt_ids) - tag_len * len(trace_ids))
    if min(rooms, default=1) < 1:
        raise DataError(f"{q.get('where', 'a question')}: a prompt of {len(prompt_ids)} tokens leaves no room for "
                        f"{len(trace_ids)} traces in one --layout concat row of --max_len {max_len}: {q['prompt'][:60]!r}")
    truncated = sum(len(ids) > r for ids, r in zip(trace_ids, rooms))
    return {"prompt_ids": prompt_ids, "trace_ids": [ids[:r] for ids, r in zip(trace_ids, rooms)],
            "truncated": truncated}


def concat_room(lengths, room):
    """Tokens each trace may keep so that together they hold at most `room` (the concat row's bound):
    the shortest traces first, each taking at most an even share of what is left, so that a short
    trace is never cut and the long ones are cut to equal lengths. [int] in the order of `lengths`."""
    keep = [0] * len(lengths)
    for done, i in enumerate(sorted(range(len(lengths)), key=lambda i: lengths[i])):
        keep[i] = min(lengths[i], room // (len(lengths) - done))
        room -= keep[i]
    return keep


def make_sequence(prompt_ids, tag_ids, trace_ids, max_trace_tokens=None):
    """(input_ids, labels) of prompt + tag + trace; labels only on the first `max_trace_tokens`
    trace tokens (all of them by default). The prompt and the forking tag carry no loss."""
    trace_ids = trace_ids[:max_trace_tokens]
    input_ids = prompt_ids + tag_ids + trace_ids
    labels = [IGNORE] * (len(prompt_ids) + len(tag_ids)) + trace_ids
    return input_ids, labels


def collate(sequences, pad_id):
    """List of (input_ids, labels) -> input_ids, labels, attention_mask: [B, L], right-padded.
    A PAD sequence is ([pad_id], [IGNORE]): one token, no loss."""
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, (ids, lab) in enumerate(sequences):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(lab)] = torch.tensor(lab)
        attention_mask[b, :len(ids)] = 1
    return input_ids, labels, attention_mask


# ----------------------------------------------------------------------------- concat layout (A.5)

def make_branches(prompt_ids, branches):
    """One row of the sequence-concatenation layout (Appendix A.5): the prompt once, then each
    matched branch (tag_ids, trace_ids). Returns (input_ids, labels, position_ids, branch_ids), each
    a list of one length: branch 0 is the prompt, branch b >= 1 the b-th (forking token + trace).
    Every branch's positions continue from the end of the prompt, as if it were alone."""
    input_ids, labels = list(prompt_ids), [IGNORE] * len(prompt_ids)
    position_ids, branch_ids = list(range(len(prompt_ids))), [0] * len(prompt_ids)
    for b, (tag_ids, trace_ids) in enumerate(branches, start=1):
        ids, lab = make_sequence([], tag_ids, trace_ids)
        input_ids += ids
        labels += lab
        position_ids += range(len(prompt_ids), len(prompt_ids) + len(ids))
        branch_ids += [b] * len(ids)
    return input_ids, labels, position_ids, branch_ids


def collate_branches(rows, pad_id, bucket=False):
    """Rows of make_branches -> input_ids, labels, position_ids, branch_ids: [B, L], right-padded
    (padding has branch id -1). A PAD row is ([pad_id], [IGNORE], [0], [-1]). bucket: L is rounded
    up by bucket_length, so that FlexAttention compiles one graph per bucket, not per length."""
    width = max(len(r[0]) for r in rows)
    width = bucket_length(width) if bucket else width
    out = [torch.full((len(rows), width), fill, dtype=torch.long) for fill in (pad_id, IGNORE, 0, -1)]
    for b, row in enumerate(rows):
        for tensor, values in zip(out, row):
            tensor[b, :len(values)] = torch.tensor(values)
    return out


def bucket_length(length, per_octave=4, smallest=128):
    """The row width `length` is padded to under FlexAttention: a multiple of 2^(e - 2) for lengths
    in [2^e, 2^(e+1)) (four widths per octave: at most 25% padding), and at least `smallest` (its
    block size). A run of rows up to L tokens so compiles at most num_buckets(L) graphs, where every
    distinct length would compile one (torch guards on the BlockMask's lengths) and, past Dynamo's
    recompile limit, fall back to eager FlexAttention, which materialises the B x H x L x L scores."""
    if length <= smallest:
        return smallest
    step = 2 ** max(0, length.bit_length() - 1 - (per_octave.bit_length() - 1))
    return -(-length // step) * step


def num_buckets(max_len, per_octave=4, smallest=128):
    """How many widths bucket_length gives to rows of 1..max_len tokens."""
    return len({bucket_length(n, per_octave, smallest) for n in range(1, max_len + 1)})


def tree_mask(branch_ids):
    """The attention mask of the concat layout, [B, 1, L, L] bool (True = may attend): query q sees
    key k <= q when k is in the prompt or in q's own branch, never another branch. Padding (-1)
    sees earlier padding only, so no row of the mask is empty. For SDPA: the eager attention path
    adds its mask to the scores, so a boolean mask there would be silently wrong."""
    q, k = branch_ids[:, :, None], branch_ids[:, None, :]
    length = branch_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=branch_ids.device).tril()
    return (causal & ((k == q) | ((k == 0) & (q >= 0))))[:, None]


def tree_attention(branch_ids):
    """The tree mask in the form the device's attention takes: a FlexAttention BlockMask on CUDA,
    a dense boolean mask for SDPA elsewhere (FlexAttention has no backward on the CPU)."""
    return tree_block_mask(branch_ids) if branch_ids.device.type == "cuda" else tree_mask(branch_ids)


def tree_block_mask(branch_ids):
    """The same mask as a FlexAttention BlockMask (CUDA): built from the rule block by block under
    torch.compile, never as an L x L tensor (on the CPU, where only the tests use it, eagerly)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def rule(b, h, q, k):
        bq, bk = branch_ids[b, q], branch_ids[b, k]
        return (k <= q) & ((bk == bq) | ((bk == 0) & (bq >= 0)))
    batch, length = branch_ids.shape  # compiled on CUDA: without it the rule is evaluated on the full grid
    return create_block_mask(rule, batch, None, length, length, device=branch_ids.device, _compile=branch_ids.is_cuda)


# ----------------------------------------------------------------------------- batching

def balance(loads, world_size):
    """Algorithm 2's queue, global view, by tokens: items spread over ranks by load, the largest
    first, each onto the rank with the least load so far (longest-processing-time first), so that a
    step waits less for its slowest rank.
    Returns, per rank, the indices of its items in ascending order. Deterministic, so every rank
    computes the same split without communication."""
    ranks, total = [[] for _ in range(world_size)], [0] * world_size
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        r = min(range(world_size), key=lambda r: (total[r], r))
        ranks[r].append(i)
        total[r] += loads[i]
    return [sorted(r) for r in ranks]


def pad_item(pad_id, layout="batch"):
    """A PAD sequence (batch layout) or PAD row (concat layout): one token, no loss."""
    return ([pad_id], [IGNORE]) if layout == "batch" else ([pad_id], [IGNORE], [0], [-1])


def micro_batches(items, micro_batch, num_batches, pad):
    """Cuts a rank's queue (questions stitched together) into `num_batches` micro-batches: longest
    items first, so that items of similar length share a batch and little width is padded, at most
    `micro_batch` per batch, then batches of one PAD item (one token, no loss) up to `num_batches`.
    Every rank runs the same number of forwards, which FSDP's collectives require (the shapes may
    differ). Returns (batches, order): batches[k][i] is items[order[k * micro_batch + i]]."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    batches = [[items[i] for i in order[s:s + micro_batch]] for s in range(0, len(items), micro_batch)]
    assert len(batches) <= num_batches
    return batches + [[pad]] * (num_batches - len(batches)), order


def num_micro_batches(num_sequences, micro_batch):
    return max(1, math.ceil(num_sequences / micro_batch))


# ----------------------------------------------------------------------------- the pool-to-mixed recipe

def mix(pool_paths, num_traces, per_source, correct_only, seed):
    """The paper's data recipe (Appendix A.3.1): every trace of every file pooled per question (the
    same prompt text), each with its source (the row's `sources`, the s1K teacher, else the file's
    name); with `correct_only`, only traces whose final answer the project's grader (grader.grade)
    accepts against the question's gold, the final answer of its gold field (grader.read_gold: a
    worked solution's last box, answer phrase, else last standalone number); at most `per_source` per
    source (0: all); then `num_traces` sampled per question. Seeded per question, so the same seed gives
    the same file. Returns (rows in the canonical layout, {source: Counter(pooled, wrong, kept)},
    skipped prompts, prompts whose gold could not be read: all their traces count as wrong)."""
    if correct_only:
        import grader  # here: grading starts math-verify, which only this command needs
    pool, counts = {}, {}
    for path in pool_paths:
        name = os.path.splitext(os.path.basename(path))[0]
        for q in load_questions(path):
            entry = pool.setdefault(q["prompt"], {"answer": q["answer"], "traces": []})
            entry["answer"] = entry["answer"] or q["answer"]
            entry["traces"] += zip(q["traces"], q["sources"] or [name] * len(q["traces"]))
    rows, skipped, unread = [], [], []
    for prompt, entry in pool.items():
        rng, kept = random.Random(f"{seed}:{prompt}"), []
        gold = grader.read_gold(entry["answer"]) if correct_only and entry["answer"] else None
        if correct_only and entry["answer"] and not gold:
            unread.append(prompt)
        for trace, source in entry["traces"]:
            c = counts.setdefault(source, Counter(pooled=0, wrong=0, kept=0))
            c["pooled"] += 1
            if correct_only and not (gold and grader.grade(trace, gold)[1]):
                c["wrong"] += 1
            else:
                kept.append((trace, source))
        if per_source:  # a random per_source of each source's traces
            rng.shuffle(kept)
            taken, chosen = Counter(), []
            for trace, source in kept:
                if taken[source] < per_source:
                    chosen.append((trace, source))
                    taken[source] += 1
            kept = chosen
        kept = rng.sample(kept, min(num_traces, len(kept)))
        if not kept:
            skipped.append(prompt)
            continue
        for _, source in kept:
            counts[source]["kept"] += 1
        rows.append({"prompt": prompt, "traces": [t for t, _ in kept], "sources": [s for _, s in kept],
                     "answer": entry["answer"]})
    return rows, counts, skipped, unread


def summary(questions, tokenizer=None):
    """Lines describing a data set: questions, traces per question and per source, and with a
    tokenizer the token lengths of prompts and traces (min / median / max: what --max_len and
    --match_tokens are chosen from)."""
    m = [len(q["traces"]) for q in questions]
    sources = Counter(s for q in questions for s in q["sources"] or ["(no source)"] * len(q["traces"]))
    lines = [f"{len(questions)} questions, {sum(m)} traces, per question min {min(m)} mean {sum(m) / len(m):.2f} "
             f"max {max(m)}", "traces per source: " + ", ".join(f"{s} {n}" for s, n in sources.most_common())]
    if tokenizer is not None:
        for what, texts in (("prompt", [prompt_text(tokenizer, q["prompt"]) for q in questions]),
                            ("trace", [t for q in questions for t in q["traces"]])):
            lengths = sorted(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)
            lines.append(f"{what} tokens: min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    return lines


@dataclass
class CheckConfig:
    data: str = ""  # a JSONL or Parquet file of any layout above
    model: str = ""  # a tokenizer for the token lengths ('' = none; toy = toy.py's)


@dataclass
class MixConfig:
    pool: list = field(default_factory=list)  # JSONL or Parquet files of traces for the same questions
    traces: int = 4  # traces sampled per question (the paper's s1k-4mixed-reasoning: 4)
    per_source: int = 0  # at most this many traces of one source per question (0: no limit)
    correct_only: bool = False  # keep only traces whose final answer grader.py accepts against the gold's
    seed: int = 0  # the samples are a function of (seed, prompt)
    out: str = "mixed.jsonl"  # the mixed file, in the canonical layout (prompt, traces, sources, answer)


def main(argv):
    """python data.py --data FILE [--model M]   or   python data.py mix --pool FILE ... --out FILE"""
    if argv[:1] == ["mix"]:
        parser, given = parse_flags(MixConfig, mix.__doc__, argv[1:])
        cfg = MixConfig(**given)
        if not cfg.pool or cfg.traces < 1 or cfg.per_source < 0:
            parser.error("need --pool FILE [FILE ...], --traces >= 1 and --per_source >= 0")
        rows, counts, skipped, unread = mix(cfg.pool, cfg.traces, cfg.per_source, cfg.correct_only, cfg.seed)
        for source, c in sorted(counts.items()):
            print(f"{source}: {c['pooled']} pooled, {c['wrong']} dropped as wrong, {c['kept']} kept")
        if cfg.correct_only:
            print(f"{len(unread)} golds could not be read (no box, answer phrase or standalone number): their "
                  f"traces were dropped{': ' + str([p[:50] for p in unread[:5]]) if unread else ''}")
        if skipped:
            print(f"{len(skipped)} questions with no trace left, skipped: {[p[:50] for p in skipped[:5]]}")
        if not rows:
            raise DataError("no question has a trace left: nothing written")
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        write_jsonl(cfg.out, rows)
        print(f"wrote {cfg.out}: {len(rows)} questions")
        return rows
    parser, given = parse_flags(CheckConfig, __doc__, argv)
    cfg = CheckConfig(**given)
    if not cfg.data:
        parser.error("need --data FILE")
    tokenizer = None
    if cfg.model == "toy":
        import toy
        tokenizer = toy.make_tokenizer()
    elif cfg.model:
        from transformers import AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        except (OSError, ValueError) as e:
            raise DataError(f"--model {cfg.model}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    print(f"{cfg.data}: " + "\n".join(summary(load_questions(cfg.data), tokenizer)))


if __name__ == "__main__":
    import sys
    try:
        main(sys.argv[1:])
    except DataError as e:
        raise SystemExit(f"error: {e}")
