"""Files a run writes and reads: JSON that a kill never leaves half-written, JSONL read with the
line of any error, an output directory checked before anything is written, and one run at a time in
it (a lock). `DataError` is the one exception for bad input: its message names the file and line
(or the flag), and every script turns it into one line on stderr and a non-zero exit.
"""
import fcntl
import hashlib
import json
import math
import os
import socket
import tempfile


class DataError(ValueError):
    """Bad input: the message names the file and line (or the flag)."""


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


def sha256(path):
    """The hex sha256 of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def regular_file(path):
    """DataError unless `path` is missing (the reader names that) or a regular file: reading a FIFO
    with no writer would block forever, a directory fails obscurely."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise DataError(f"{path}: not a regular file")


def model_problem(model):
    """The --model problem for flags.check, or None: a GGUF file is not loaded as it stands (every stage
    takes a Hugging Face folder or hub name); tools/smollm2.py makes a folder of it once."""
    if model.endswith(".gguf"):
        return (f"--model {model} is a GGUF file: make a folder of it once, then pass the folder: "
                f"python tools/smollm2.py --gguf {model} --out models/NAME")
    return None


def load_tokenizer(model, trust_remote_code=False):
    """The tokenizer of a Hugging Face folder or hub name (every stage's --model). Raises DataError
    naming --model and the first line of the cause."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"--model {model}: cannot load a tokenizer ({why})") from None


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
