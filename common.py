"""Plumbing every script shares: rank-0 printing, process-group set-up, flags from a config
dataclass, JSON files that a kill never leaves half-written, and one run at a time in an output
directory. Nothing here knows about SSFT.
"""
import argparse
import dataclasses
import difflib
import fcntl
import inspect
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist


class DataError(ValueError):
    """Bad input: the message names the file and line (or the flag)."""


# ----------------------------------------------------------------------------- processes

def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


_OWN_GROUP = False  # whether init_distributed created the process group (and so may destroy it)


def init_distributed():
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; plain `python` becomes a world of
    one, so the same collectives run either way. A group that already exists (a test driving the
    passes in-process) is used as it is."""
    global _OWN_GROUP
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # NCCL for GPU tensors, gloo for CPU ones
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed():
    """Destroys the process group if init_distributed created it, never someone else's."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def all_max(x, device):
    """The maximum of an int (or bool) over the ranks."""
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_sum(values, device):
    """[float]: the element-wise sum of a list of numbers over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


STOP = []  # the signals received: SIGTERM (a scheduler about to preempt) or SIGINT (Ctrl-C)


def on_stop_signal(signum, frame):
    """First signal: the stage finishes its optimiser step, writes a checkpoint, exits. A second: stop at once."""
    if STOP:
        raise KeyboardInterrupt
    STOP.append(signum)
    print0(f"{signal.Signals(signum).name}: finishing this step, then a checkpoint (again to stop at once)")


@contextmanager
def stage_run(out_dir, rank):
    """The run of a training stage in `out_dir` on every rank: one run at a time (a lock held by rank 0;
    a second run exits naming the holder, on every rank) and SIGTERM/SIGINT recorded in STOP for the
    stage's loop to act on after its step. Restores the signal handlers and releases the lock on exit."""
    lock, refused = None, None
    try:  # a second run in the same directory would interleave logs and checkpoints
        lock = lock_dir(out_dir) if rank == 0 else None
    except DataError as e:
        refused = str(e)
    handlers = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    STOP.clear()
    try:
        refused = broadcast(refused)
        if refused:
            sys.exit(f"error: {refused}")
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if lock:
            lock.close()


# ----------------------------------------------------------------------------- flags

def parse_flags(config_cls, doc, argv=None, positional=()):
    """One --flag per field of a config dataclass, its trailing comment as the help, so that --help
    documents every field; fields named in `positional` are positional arguments instead.
    Returns (parser, {field: value} of the flags given). A flag is only ever its full name: argparse
    would otherwise take any unique prefix (--max_step for --max_steps), so that a typo silently sets
    another field; an unknown flag exits (status 2) naming the closest real ones."""
    comments = dict(re.findall(r"^\s+(\w+): [\w.]+ = .*?  # (.*)$", inspect.getsource(config_cls), re.M))
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


# ----------------------------------------------------------------------------- files

def strict(obj):
    """obj with every non-finite float as None: JSON has no NaN or Infinity, and strict readers
    reject them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def write_json(path, obj):
    """Written to a temporary name and renamed: a kill never leaves a half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(strict(obj), f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def write_jsonl(path, rows):
    """A whole JSONL file, written to a temporary name and renamed."""
    with open(path + ".tmp", "w") as f:
        f.write("".join(json.dumps(strict(r), allow_nan=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def append_jsonl(path, obj):
    """One JSON line, synced to disk. A kill loses at most this line: readers skip an unfinished
    last line (read_jsonl), and the next append cuts it first, so that rows always start a line
    (a last row that is whole but lacks its newline, as other tools write, gets one instead)."""
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                text = f.read()
                start = text.rfind(b"\n") + 1
                if whole(text[start:]):
                    f.write(b"\n")
                else:  # the unfinished row of a killed run
                    f.truncate(start)
        f.write((json.dumps(strict(obj), allow_nan=False) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def whole(line):
    """Whether the bytes of a last line without its newline are a whole JSON value."""
    try:
        json.loads(line.decode("utf-8"))
        return True
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def read_jsonl(path, drop_truncated_tail=False):
    """[(line number, object)] of a JSONL file. A missing file, non-UTF-8 bytes or malformed JSON
    raise DataError naming path:line, except, with drop_truncated_tail, an unterminated last line
    that is not whole JSON (a run killed mid-write), which is dropped."""
    regular_file(path)
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if drop_truncated_tail and not whole(lines[-1]):
        lines[-1] = b""  # after the last newline: empty, or the unfinished row of a killed run
    rows = []
    for n, line in enumerate(lines, start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 (byte {e.start})") from None
        if text.strip():
            try:
                rows.append((n, json.loads(text)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg}, column {e.colno})") from None
    return rows


def regular_file(path):
    """DataError unless `path` is missing (the reader names that) or a regular file: reading a FIFO
    with no writer would block forever, a directory fails obscurely."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")


def read_json(path):
    """A JSON file we wrote earlier; DataError naming the file if it is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); move it away or choose another directory") from None


def changed_settings(saved_path, cfg, keys):
    """{field: saved value} of the fields in `keys` whose value in cfg differs from the config saved
    at `saved_path` ({} when nothing is saved there)."""
    if not os.path.exists(saved_path):
        return {}
    old = read_json(saved_path)
    if not isinstance(old, dict):
        raise DataError(f"{saved_path}: not a saved config (a JSON object of settings)")
    return {k: old.get(k) for k in keys if old.get(k) != getattr(cfg, k)}


def writable_dir(path):
    """Creates directory `path` if needed and checks that files can be written in it; DataError
    naming it otherwise (an existing file, a read-only place)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{path}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot write there ({e.strerror})") from None


def lock_dir(path):
    """An exclusive lock on directory `path`, held while the returned file stays open: a second
    process that asks gets DataError naming the holder. The kernel drops the lock when the holder
    dies, so the lock file of a killed run never blocks the next one."""
    f = open(os.path.join(path, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise DataError(f"{path} is in use by a running job ({holder}): wait for it to end, "
                        "or choose another directory") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f
