"""The grader against its peers' test cases: the (gold, prediction, expected) rows of the parametrized
tests of huggingface/Math-Verify (tests/*.py) and huggingface/lighteval
(tests/unit/metrics/test_extractive_match.py), read as data from checkouts of those repositories;
no code of theirs runs. English rows only, and only the default comparison (no strict=False,
allow_set_relation_comp or letter-choice rows). Each distinct (gold, prediction) pair is graded once
by grader.grade: a prediction with a box or with prose (a word of 3+ letters outside math) is the
response as written, any other is boxed ("The final answer is $\\boxed{...}$."), with no question and
as a finished response. Results: docs/grading.md.

    python tools/peer_check.py PATH/TO/Math-Verify PATH/TO/lighteval   # checkouts, or folders of their test files
"""
import ast
import glob
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from plumbing import grader  # noqa: E402


def literal(node):
    return node.attr if isinstance(node, ast.Attribute) else ast.literal_eval(node)  # Language.ENGLISH -> "ENGLISH"


def cases(path):
    """[(gold, pred, expected)] of every parametrized test in `path` whose arguments include gold and pred."""
    found = []
    for fn in ast.walk(ast.parse(open(path).read())):
        if not isinstance(fn, ast.FunctionDef) or "NativeLetters" in ast.unparse(fn):
            continue
        for dec in fn.decorator_list:
            if not (isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("parametrize")):
                continue
            names = [n.strip() for n in literal(dec.args[0]).split(",")]
            if not {"gold", "pred"} <= set(names):
                continue
            for row in dec.args[1].elts:
                try:
                    args = dict(zip(names, map(literal, row.args if isinstance(row, ast.Call) else row.elts)))
                except ValueError:  # an f-string computed at run time: not data
                    continue
                if args.get("language", "ENGLISH") == "ENGLISH" and args.get("strict", True) \
                        and not args.get("allow_set_relation_comp"):
                    found.append((args["gold"], args["pred"], bool(args.get("expected", args.get("result")))))
    return found


def as_response(pred):
    if "\\boxed" in pred or re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", re.sub(r"\$\$.+?\$\$|\$.+?\$|\\\(.+?\\\)|\\\[.+?\\\]", " ", pred, flags=re.S)):
        return pred
    m = re.fullmatch(r"\s*(\$\$|\$|\\\[|\\\()(.*?)(\$\$|\$|\\\]|\\\))\s*", pred, re.S)
    return "The final answer is $\\boxed{" + (m.group(2).strip() if m and "$" not in m.group(2) else pred.strip()) + "}$."


def main(math_verify_dir, lighteval_dir):
    files = sorted(glob.glob(os.path.join(math_verify_dir, "tests", "test_*.py")) or
                   glob.glob(os.path.join(math_verify_dir, "test_*.py")))  # a checkout, or its tests/ alone
    files += [p for p in (os.path.join(lighteval_dir, "tests", "unit", "metrics", "test_extractive_match.py"),
                          os.path.join(lighteval_dir, "test_extractive_match.py")) if os.path.exists(p)][:1]
    if len(files) < 2:
        raise SystemExit(f"no test files under {math_verify_dir} or {lighteval_dir}")
    distinct = {}
    for path in files:
        for gold, pred, expected in cases(path):
            distinct.setdefault((gold, pred), expected)
    disagree = []
    for (gold, pred), expected in distinct.items():
        answer, correct = grader.grade(as_response(pred), gold)
        if correct != expected:
            disagree.append((expected, gold, pred, answer))
    print(f"{len(distinct) - len(disagree)} of {len(distinct)} distinct pairs graded as the peers expect "
          f"({100 * (1 - len(disagree) / len(distinct)):.1f}%)")
    for expected, gold, pred, answer in sorted(disagree):
        print(f"peers {'right' if expected else 'wrong'}, ours {'wrong' if expected else 'right'}: gold {gold!r:.60} "
              f"| prediction {pred!r:.80} | our answer {answer!r:.50}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.rsplit("\n\n", 1)[-1])
    main(*sys.argv[1:])
