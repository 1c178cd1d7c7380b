"""Command-line flags from a config dataclass: one --flag per field, its trailing comment as the
help, so that `--help` documents every field; a flag only by its full name; and the checks of the
values, so that a bad value stops at the door with one message naming the flag.
"""
import argparse
import dataclasses
import difflib
import inspect
import math
import re


def parse_flags(config_cls, doc, argv=None, positional=()):
    """One --flag per field of a config dataclass, its trailing comment as the help, so that --help
    documents every field; fields named in `positional` are positional arguments instead.
    Returns (parser, {field: value} of the flags given). A flag is only ever its full name: argparse
    would otherwise take any unique prefix (--max_step for --max_steps), so that a typo silently sets
    another field; an unknown flag exits (status 2) naming the closest real ones."""
    comments = field_comments(config_cls)
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    for f in dataclasses.fields(config_cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{comments[f.name]} (default {default!r})".replace("%", "%%")
        if f.name in positional:
            parser.add_argument(f.name, type=f.type, nargs="?", default=None, help=help_text)
            continue
        extra = dict(type=boolean, nargs="?", const=True) if f.type is bool else \
            dict(type=str, nargs="+") if f.type is list else dict(type=number(f.type))
        parser.add_argument(f"--{f.name}", default=None, **extra, help=help_text)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_flags_message(unknown, [o for a in parser._actions for o in a.option_strings]))
    given = {k: v for k, v in vars(args).items() if v is not None}
    return parser, given


def field_comments(config_cls):
    """{field: its comment} of a config dataclass: the comment after the field, and the comment-only
    lines right below it (a comment too long for one line goes on)."""
    comments, name = {}, None
    for line in inspect.getsource(config_cls).splitlines():
        field_line = re.match(r"^\s+(\w+): [\w.]+ = .*?  # (.*)$", line)
        more = re.match(r"^\s+# (.*)$", line)
        if field_line:
            name = field_line.group(1)
            comments[name] = field_line.group(2)
        elif more and name:
            comments[name] += " " + more.group(1)
        else:
            name = None
    return comments


def unknown_flags_message(unknown, flags):
    """argparse's "unrecognized arguments" line, with the closest real flag(s) for each unknown one
    (--max_step: did you mean --max_steps?)."""
    hints = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if name.startswith("-"):
            close = difflib.get_close_matches(name, flags, n=2, cutoff=0.6)
            close += [f for f in flags if f.startswith(name) and f not in close]  # the prefix argparse took before
            hints.append(f"{name}: did you mean {' or '.join(close[:3])}?" if close else f"{name}: no such flag (see --help)")
    return f"unrecognized arguments: {' '.join(unknown)}" + "".join(f"; {h}" for h in hints)


def boolean(text):
    """A bare --flag means true; otherwise true/false, 1/0 or yes/no."""
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def number(kind):
    """int and str as they are; a float flag must be finite (nan or inf is never a setting)."""
    if kind is not float:
        return kind

    def finite_float(text):
        value = float(text)
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        return value
    finite_float.__name__ = "float"  # argparse names the type in its message
    return finite_float


def check(parser, cfg, rules, problems=()):
    """Exits (status 2, argparse's usage line) naming every flag whose value breaks its rule, plus the
    `problems` a script found itself. rules: {field: rule}, a rule being a tuple of the allowed values,
    a bound ("> 0", ">= 1", "<= 1") or an interval ("[0, 1)", "(0, 1]", "[1, 1024]")."""
    bad = [f"--{name} must be {describe(rule)} (got {getattr(cfg, name)!r})"
           for name, rule in rules.items() if not allowed(getattr(cfg, name), rule)]
    bad += [p for p in problems if p]
    if bad:
        parser.error("; ".join(bad))


def allowed(value, rule):
    if isinstance(rule, tuple):
        return value in rule
    m = re.fullmatch(r"(>=|>|<=|<) *(\S+)", rule)
    if m:
        op, bound = m.group(1), float(m.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    m = re.fullmatch(r"([\[(]) *(\S+), *(\S+) *([\])])", rule)
    assert m, f"not a rule: {rule!r}"
    low, high = float(m.group(2)), float(m.group(3))
    return (value >= low if m.group(1) == "[" else value > low) and (value <= high if m.group(4) == "]" else value < high)


def describe(rule):
    """A rule in words: "hungarian, random or sft", "from 1 to 1024", "> 0", "in [0, 1)"."""
    if isinstance(rule, tuple):
        return ", ".join(map(str, rule[:-1])) + f" or {rule[-1]}" if len(rule) > 1 else str(rule[0])
    closed = re.fullmatch(r"\[(\d+), *(\d+)\]", rule)
    return f"from {closed.group(1)} to {closed.group(2)}" if closed else rule if rule[0] in "<>" else f"in {rule}"
