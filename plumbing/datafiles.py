"""Training data files as researchers get them, and the paper's pool-to-mixed recipe (Appendix A.3.1).

Rows of a file may use any of these layouts, detected per row:
    canonical  {"prompt": str, "traces": [str, ...], "answer": str?, "sources": [str, ...]?}
    s1K-1.1    {"question": str, "<teacher>_thinking_trajectory": str, "<teacher>_attempt": str, ...}
               one trace per teacher: trajectory + "\\n</think>\\n\\n" + attempt, source = teacher
    sampled    {"question": str, "response": [str, ...], "score": [bool, ...]}: correct ones kept
Files are JSONL or Parquet (by extension; the hub publishes s1K-1.1 as Parquet). Every bad row raises
DataError naming the file and line (or Parquet row). `mix` builds a multi-target file from
per-teacher files (`python data.py mix ...`).
"""
import os
import random
from collections import Counter
from dataclasses import dataclass, field

from plumbing.files import DataError, read_jsonl, regular_file, write_jsonl
from plumbing.flags import parse_flags


GOLD_FIELDS = ("answer", "ground_truth", "gt", "solution")  # where a row's gold answer is, first found wins


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
        from plumbing import grader  # here: grading starts math-verify, which only this command needs
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


def summary(questions, tokenizer=None, prompts=None):
    """Lines describing a data set: questions, traces per question and per source, and with a
    tokenizer the token lengths of the rendered `prompts` and of the traces (min / median / max: what
    --max_len and --match_tokens are chosen from)."""
    m = [len(q["traces"]) for q in questions]
    sources = Counter(s for q in questions for s in q["sources"] or ["(no source)"] * len(q["traces"]))
    lines = [f"{len(questions)} questions, {sum(m)} traces, per question min {min(m)} mean {sum(m) / len(m):.2f} "
             f"max {max(m)}", "traces per source: " + ", ".join(f"{s} {n}" for s, n in sources.most_common())]
    if tokenizer is not None:
        for what, texts in (("prompt", prompts), ("trace", [t for q in questions for t in q["traces"]])):
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


def check_main(argv, doc, load_tokenizer, prompt_text):
    """python data.py --data FILE [--model M]: prints the file's summary. load_tokenizer(model): the
    tokenizer of --model (raising DataError); prompt_text(tokenizer, prompt): data.prompt_text."""
    parser, given = parse_flags(CheckConfig, doc, argv)
    cfg = CheckConfig(**given)
    if not cfg.data:
        parser.error("need --data FILE")
    tokenizer = load_tokenizer(cfg.model) if cfg.model else None
    questions = load_questions(cfg.data)
    prompts = [prompt_text(tokenizer, q["prompt"]) for q in questions] if tokenizer else None
    print(f"{cfg.data}: " + "\n".join(summary(questions, tokenizer, prompts)))


def mix_main(argv):
    """python data.py mix --pool FILE ... --out FILE: the recipe's command line."""
    parser, given = parse_flags(MixConfig, mix.__doc__, argv)
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
