"""GSM8K questions solved in four styles that really differ: the multi-teacher data of the real-model run.

Every GSM8K reference solution carries calculator notes, `<<16-3-4=9>>`, one per arithmetic step, and
ends with `#### N`. From those notes alone each question gets four traces, one per "teacher" (source):
    prose      the reference solution as given, notes removed
    equations  the steps only, one `16 - 3 - 4 = 9` per line
    python     a short program: one variable per step, earlier results by name, then print(answer)
    backward   from the goal back: "We need 9 * 2." then each earlier step it rests on, then forward
Every trace ends with the same line, `Answer: N`, so that they differ in how they reason and not in how
they answer. A question is kept only when every note's expression (numbers, + - * / and brackets)
evaluates to its result (within 1e-4, relative) and the last note's result is the gold answer: 1,203
of the 1,319 test questions. Traces are shuffled per question (seeded), so a trace's place says nothing
of its style.

The questions are GSM8K *test* questions: a model trained on this file is contaminated for GSM8K
evaluation. It serves to see whether forking tokens specialise by style (Section 3.3), not to measure
accuracy.

    python tools/gsm8k_styles.py     # -> data/gsm8k_styles.train.jsonl, data/gsm8k_styles.heldout.jsonl
    python tools/gsm8k_styles.py --train 80 --held_out 100 --seed 0

Output rows are train.py's canonical layout: {"prompt", "traces", "sources", "answer"}, plus "id"
(the question's line in the input file, from 1); train and held-out questions never overlap.
"""
import ast
import copy
import dataclasses
import json
import os
import random
import re
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from plumbing.files import DataError, read_jsonl, write_jsonl
from plumbing.flags import parse_flags

STYLES = ("prose", "equations", "python", "backward")
NOTE = re.compile(r"<<([^<>]*)>>")
OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


@dataclass
class Config:
    gsm8k: str = "../shared/data/gsm8k_test.jsonl"  # GSM8K rows {"question", "answer"} with calculator notes and "#### N"
    train: int = 400  # training questions written (taken after the held-out ones in the seeded order)
    held_out: int = 100  # held-out questions written, never in the training file
    seed: int = 0  # the order of the questions and of each question's traces
    out: str = "data/gsm8k_styles"  # writes OUT.train.jsonl and OUT.heldout.jsonl


# ----------------------------------------------------------------------------- the notes

def value(node):
    """The number of an arithmetic expression's AST (numbers, + - * /, unary minus); ValueError else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -value(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, OPS):
        a, b = value(node.left), value(node.right)
        return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) \
            else a * b if isinstance(node.op, ast.Mult) else a / b
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def number(text):
    """A result as written ("130000", "1.50", "$5") -> float; ValueError if it is not a number."""
    return float(text.strip().lstrip("$").replace(",", ""))


def show(x):
    """A number as a solution writes it: 9, 2.5 (no trailing .0, at most 4 decimals)."""
    return str(int(round(x))) if abs(x - round(x)) < 1e-9 else f"{x:.4f}".rstrip("0")


def parse_steps(answer):
    """[(expression AST, result)] of a GSM8K solution's calculator notes, and the gold answer (float).
    ValueError when there is no note, a note does not parse or evaluate to its result, or the last
    result is not the gold answer: such a question cannot be rendered faithfully in every style."""
    gold = number(answer.rsplit("####", 1)[1]) if "####" in answer else None
    steps = []
    for note in NOTE.findall(answer):
        expr, _, result = note.partition("=")
        tree = ast.parse(expr.strip(), mode="eval").body
        got, want = value(tree), number(result)
        if abs(got - want) > 1e-4 * max(1.0, abs(want)):
            raise ValueError(f"note {note!r}: evaluates to {got}")
        steps.append((tree, want))
    if not steps or gold is None or abs(steps[-1][1] - gold) > 1e-9:
        raise ValueError("no notes, or the last note is not the answer")
    return steps, gold


# ----------------------------------------------------------------------------- the four styles

def prose(answer, gold):
    body = NOTE.sub("", answer.rsplit("####", 1)[0]).strip()
    return f"{body}\nAnswer: {show(gold)}"


def equations(steps, gold):
    return "\n".join(f"{ast.unparse(tree)} = {show(r)}" for tree, r in steps) + f"\nAnswer: {show(gold)}"


def python_program(steps, gold, question):
    """One variable per step; a number equal to an earlier step's result, and not written in the
    question, is that step's variable (the latest such step)."""
    names = [f"step{k + 1}" for k in range(len(steps) - 1)] + ["answer"]
    given = {number(n) for n in re.findall(r"\d[\d,]*\.?\d*", question.replace(",", "")) if n.strip(".")}

    class Rename(ast.NodeTransformer):
        def __init__(self, known):
            self.known = known  # [(name, result)] of the earlier steps

        def visit_Constant(self, node):
            if type(node.value) in (int, float) and node.value not in given:
                for name, r in reversed(self.known):
                    if abs(node.value - r) < 1e-9:
                        return ast.Name(id=name)
            return node
    lines = [f"{name} = {ast.unparse(Rename(list(zip(names, (r for _, r in steps[:k])))).visit(copy.deepcopy(tree)))}"
             for k, (name, (tree, _)) in enumerate(zip(names, steps))]
    return "```python\n" + "\n".join(lines) + "\nprint(answer)\n```\n" + f"Answer: {show(gold)}"


def backward(steps, gold):
    """From the goal back to the givens, then one line forward."""
    last, _ = steps[-1]
    lines = [f"We need {ast.unparse(last)}."]
    lines += [f"For that we need {show(r)} = {ast.unparse(tree)}." for tree, r in reversed(steps[:-1])]
    lines.append(f"So {ast.unparse(last)} = {show(gold)}.")
    return "\n".join(lines) + f"\nAnswer: {show(gold)}"


def render(row):
    """{"prompt", "traces", "sources", "answer"} of one GSM8K row, traces in STYLES order; ValueError
    when its notes cannot be rendered (parse_steps)."""
    steps, gold = parse_steps(row["answer"])
    traces = [prose(row["answer"], gold), equations(steps, gold), python_program(steps, gold, row["question"]),
              backward(steps, gold)]
    return {"prompt": row["question"], "traces": traces, "sources": list(STYLES), "answer": show(gold)}


def shuffled(q, rng):
    order = rng.sample(range(len(q["traces"])), len(q["traces"]))
    return {**q, "traces": [q["traces"][i] for i in order], "sources": [q["sources"][i] for i in order]}


def make(rows, train, held_out, seed):
    """(train questions, held-out questions, number of rows kept) from GSM8K rows [(line, row)]."""
    kept = []
    for line, row in rows:
        try:
            kept.append({"id": line, **render(row)})
        except (ValueError, SyntaxError, ZeroDivisionError, IndexError):
            continue
    if train + held_out > len(kept):
        raise DataError(f"--train {train} + --held_out {held_out} > the {len(kept)} questions that render")
    rng = random.Random(seed)
    order = rng.sample(kept, len(kept))
    picked = [shuffled(q, rng) for q in order[:held_out + train]]
    return picked[held_out:], picked[:held_out], len(kept)


def main(argv=None):
    _, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    print(json.dumps(dataclasses.asdict(cfg)))
    try:
        rows = read_jsonl(cfg.gsm8k)
        bad = [line for line, r in rows if not (isinstance(r, dict) and isinstance(r.get("question"), str)
                                                and isinstance(r.get("answer"), str))]
        if bad:
            raise DataError(f"{cfg.gsm8k}:{bad[0]}: expected {{'question': str, 'answer': str}}")
        train, held, kept = make(rows, cfg.train, cfg.held_out, cfg.seed)
    except DataError as e:
        sys.exit(f"error: {e}")
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    for name, part in (("train", train), ("heldout", held)):
        write_jsonl(f"{cfg.out}.{name}.jsonl", part)
    print(f"{kept} of {len(rows)} questions render in all four styles; wrote {len(train)} to {cfg.out}.train.jsonl "
          f"and {len(held)} to {cfg.out}.heldout.jsonl")


if __name__ == "__main__":
    main()
