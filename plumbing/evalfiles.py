"""Evaluation files: the problems infer.py and gfpo.py read and the rows score.py reads.

Problems (`load_problems`): MATH-500, AIME, AMC, GSM8K (question + gold), GPQA-style multiple choice,
the training layouts, and DAPO-Math-17k (`prompt` a list of chat messages, the gold in
reward_model.ground_truth), each put in its prompt template: LightEval's math and multiple-choice
prompts for evaluation files, the question as it is for training layouts (as in training). The
authors' protocol for their released checkpoint (`OFFICIAL`: text tags, block order, their sample
counts) is defined here too. Rows (`read_rows`): infer.py's rows, sampled responses with labels
(math_cot_100x8.jsonl) and several models' solutions (gsm8k_test_4models.jsonl), each graded afresh.
"""
import json
import os
import random

from plumbing import datafiles, grader
from plumbing.files import DataError, changed_settings, read_jsonl


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
CHOICE_SEED = 1234  # LightEval's: one generator, one draw per GPQA problem in file order, places the gold


def official_samples(data_path, fork):
    """The authors' sample counts: 32 of one token for Pass@1, else 11 per token on AIME, 6 elsewhere."""
    return 32 if fork != "all" else 66 if "aime" in os.path.basename(data_path).lower() else 36


def fair_split_counts(total, parts):
    """Responses per forking token in the authors' block order: 10 over 3 -> [4, 3, 3]."""
    base, rem = divmod(total, parts)
    return [base + (i < rem) for i in range(parts)]


def official_preset(given, default_data):
    """The flags --protocol official sets unless given (`given`: the flags given; the authors' prompts,
    order, sampling and sample counts), {} under --protocol ours."""
    if given.get("protocol") != "official":
        return {}
    return {**OFFICIAL, "samples": official_samples(given.get("data", default_data), given.get("fork", "all"))}


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


def load_problems(path, instruction="auto", limit=0, records=None):
    """[{"id", "prompt", "gold", "kind", "template"}] of an evaluation file, a training layout or the toy:
    the question from prompt, problem or question (or a multiple-choice row, kind "choice"); the gold
    from datafiles.GOLD_FIELDS (DAPO-Math-17k: `prompt` a list of chat messages, whose last user message is
    the question, as it is, with its own answer instruction; the gold reward_model.ground_truth); the id from id, unique_id, idx or Record ID, else the row's 0-based
    position (a null counts as absent). The prompt is the question in its template."""
    rows = records if records is not None else datafiles.read_records(path)
    problems, seen, rng = [], set(), random.Random(CHOICE_SEED)
    for i, (where, row) in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        dapo = isinstance(row.get("prompt"), list)  # DAPO-Math-17k: chat messages, reward_model.ground_truth
        if dapo:
            reward_model = row.get("reward_model")
            row = {**row, "prompt": user_message(row["prompt"], where),
                   "answer": reward_model.get("ground_truth") if isinstance(reward_model, dict) else None}
        pid = datafiles.first(row, "id", "unique_id", "idx", "Record ID")
        pid = i if pid is None else pid
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise DataError(f"{where}: an id must be a string or an integer, got {json.dumps(pid)}")
        if pid in seen:
            raise DataError(f"{where}: duplicate id {pid!r}")
        seen.add(pid)
        kind = "choice" if datafiles.first(row, "Correct Answer", "choices") is not None else "math"
        if kind == "choice":
            question, gold = choice_problem(row, rng, where)
        else:
            question = next((row[k] for k in ("prompt", "problem", "question") if isinstance(row.get(k), str)), "")
            gold = datafiles.first(row, *datafiles.GOLD_FIELDS)
            if not question.strip() or gold is None or not str(gold).strip():
                raise DataError(f"{where}: need a prompt ('prompt', 'problem' or 'question') and a gold "
                                "answer ('answer', 'ground_truth', 'gt' or 'solution')")
            gold = grader.gold_answer(gold)
        plain = records is not None or dapo or datafiles.first(row, "traces", "response") is not None \
            or any(k.endswith("_thinking_trajectory") for k in row)
        form = template(instruction, kind, plain)
        problems.append({"id": pid, "prompt": form.replace("{question}", question), "gold": gold, "kind": kind,
                         "template": form})
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems[:limit or None]


def model_name(model):
    """The folder of a model's rows under eval/: out/ssft/final -> ssft, Qwen/Qwen2.5-32B -> Qwen2.5-32B, so
    that two models scored on the same file never share (or refuse to resume) a rows file."""
    parts = [p for p in os.path.normpath(model).split(os.sep) if p not in ("", ".", "..")]
    return (parts[-2] if len(parts) > 1 and parts[-1] == "final" else parts[-1]) if parts else "model"


ROW_GOLD_FIELDS = ("gt", "answer", "ground_truth", "solution")  # the gold of a sampled or models row, first found


def row_layout(row, where):
    """(gold field, completions [{"text", "fork", "label"?}]) of one row in any layout of the module
    docstring (a label where the row holds one per response); DataError naming `where` for a row of none."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    gold = next((row[k] for k in ROW_GOLD_FIELDS if row.get(k) is not None), None)
    models = {k: v for k, v in row.items() if isinstance(v, dict) and isinstance(v.get("solution"), str)}
    if "completions" in row:
        if "gold" not in row or not isinstance(row["completions"], list) or not row["completions"] or not all(
                isinstance(c, dict) and isinstance(c.get("text"), str) for c in row["completions"]):
            raise DataError(f"{where}: a row needs 'gold' and 'completions': [{{'text', ...}}, ...]")
        return row["gold"], row["completions"]
    if isinstance(row.get("response"), list) and row["response"] and all(isinstance(r, str) for r in row["response"]):
        labels = row.get("score") if isinstance(row.get("score"), list) and len(row["score"]) == len(row["response"]) \
            else [None] * len(row["response"])  # labels only where there is one per response
        return gold, [{"text": t, "fork": None, "label": s} for t, s in zip(row["response"], labels)]
    if models:
        return gold, [{"text": v["solution"], "fork": None, "source": k, "label": v.get("is_correct")}
                      for k, v in models.items()]
    raise DataError(f"{where}: unknown layout: expected 'gold' + 'completions' (infer.py's rows), a "
                    "'response' list (sampled) or {'solution'} fields (models), with a gold in "
                    f"{', '.join(ROW_GOLD_FIELDS)}")


def read_rows(path):
    """Rows of a file in any layout, each completion graded afresh from its text and the row's gold (any
    stored pred and correct are rewritten), so a file scored twice gives one answer: as finished unless
    it says "finished": false (infer.py's mark of a response cut at --max_new_tokens), and against the
    row's question (its prompt, question or problem) for the copied-number rule (docs/grading.md).
    DataError naming the line for a malformed row, an empty gold, a duplicate id or an unknown kind."""
    rows, seen = [], {}
    for n, row in read_jsonl(path, drop_truncated_tail=True):
        gold, completions = row_layout(row, f"{path}:{n}")
        question = next((row[k] for k in ("prompt", "question", "problem") if isinstance(row.get(k), str)), None)
        if "completions" not in row:
            row = {"id": row.get("id", row.get("idx", n)), "gold": gold, "completions": completions,
                   "layout": "sampled" if "response" in row else "models"}
        if "id" in row:
            if row["id"] in seen:
                raise DataError(f"{path}:{n}: duplicate id {row['id']!r} (first on line {seen[row['id']]})")
            seen[row["id"]] = n
        kind = row.get("kind") or "math"
        if kind not in ("math", "choice"):
            raise DataError(f"{path}:{n}: unknown kind {kind!r} (math or choice)")
        gold = grader.gold_answer(gold) if gold is not None else ""
        if not gold:
            raise DataError(f"{path}:{n}: the gold answer is empty")
        if kind == "choice" and not grader.letter_of(gold):
            raise DataError(f"{path}:{n}: a choice row needs a gold letter A-D, got {row['gold']!r}")
        for c in completions:
            c.setdefault("fork", None)
            if not isinstance(c.get("finished", True), bool):
                raise DataError(f"{path}:{n}: 'finished' must be true or false, got {c['finished']!r}")
            c["pred"], c["correct"] = grader.grade(c["text"], gold, kind, c.get("finished", True), question)
        rows.append(row)
    return rows


def resumable(output, cfg, same_on_resume):
    """The ids of the problems `output` already holds rows for; SystemExit when those rows were made
    with other values of the settings in `same_on_resume` (rows made otherwise must not mix in a file).
    The settings are kept in <output>.config.json, written once the model has loaded."""
    done = {r["id"] for _, r in read_jsonl(output, drop_truncated_tail=True)} if os.path.exists(output) else set()
    changed = changed_settings(output.removesuffix(".jsonl") + ".config.json", cfg, same_on_resume) if done else {}
    if changed:
        raise SystemExit(f"error: {output} holds rows made with "
                         f"{', '.join(f'--{k} {v!r}' for k, v in changed.items())}: "
                         "pass the same values to resume, or a new --output")
    return done
