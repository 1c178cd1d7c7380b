"""The evaluation and example files of ../shared/data, fetched from their public sources and checked.

Each file is a byte-for-byte copy of one file of a public GitHub repository (SOURCES.md in the data
folder says what each holds and its licence). FILES pins each to the commit that last changed it, with
its size and sha256; the copies on this project's machines were checked against those commits'
files. Downloads go to <name>.part and are renamed only once their sha256 matches, so a broken or
changed download never replaces a file; a file already there is checked, never overwritten.

    python tools/get_data.py                          # download what is missing into ../shared/data (needs a network)
    python tools/get_data.py --check ../shared/data   # download nothing: is every file there, byte for byte?
"""
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from plumbing.files import DataError, sha256, writable_dir
from plumbing.flags import parse_flags

RAW = "https://raw.githubusercontent.com"
LFS = "https://media.githubusercontent.com/media"  # prm800k keeps its .jsonl in Git LFS: raw. gives the pointer

# name: (URL pinned to a commit, size in bytes, sha256)
FILES = {
    "math500.jsonl": (f"{LFS}/openai/prm800k/00811d6de065642a6967b9017d4cee59550c0ef4/prm800k/math_splits/test.jsonl",
                      446564, "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132"),
    "aime24.jsonl": (f"{RAW}/QwenLM/QwQ/56e46a45db58dea9e7eaf062da61cda610bb71ad/eval/data/aime24.jsonl",
                     12681, "5a7a817807c8c2b6b541631deaa6d8c2eb7f0420e0f2373a25878921e920b6da"),
    "aime25.jsonl": (f"{RAW}/QwenLM/QwQ/56e46a45db58dea9e7eaf062da61cda610bb71ad/eval/data/aime25.jsonl",
                     15785, "9da60057135388687f3c594476b211538d0be8e7f3b2de6e680513281412c0ec"),
    "amc23.jsonl": (f"{RAW}/QwenLM/Qwen2.5-Math/615096eceb14e653ba791d862a21b326a1d26e12/evaluation/data/amc23/test.jsonl",
                    27631, "43707e1ca784602d8479de24ee8ce36609dbebc46dd152b0b12a46611aa898a4"),
    "gsm8k_test.jsonl": (f"{RAW}/openai/grade-school-math/b0bb162abedc65e1fdd8e93ed090fd7598ee68bc/"
                         "grade_school_math/data/test.jsonl",
                         749738, "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
    "gsm8k_test_4models.jsonl": (f"{RAW}/openai/grade-school-math/2909d34ef28520753df82a2234c357259d254aa8/"
                                 "grade_school_math/data/example_model_solutions.jsonl",
                                 2563513, "4bc62db838f8418365d51c627bd66294cbdca9fb7f01519cb13f0dce8c51580b"),
    "math_cot_100x8.jsonl": (f"{RAW}/QwenLM/Qwen2.5-Math/9e9bc401157974ecbab1ee967a31663bc5fc8287/"
                             "evaluation/data/eval_rm_maj_example/math_cot_100.jsonl",
                             2164566, "5b9128525733336c4b5bf5d3222f72b18655a305258dc09c301b546e9365ba5e"),
}


@dataclass
class Config:
    out_dir: str = "../shared/data"  # where the files go (the scripts and the README read ../shared/data)
    check: str = ""  # only check the files in this folder, download nothing ('' = download into --out_dir)
    timeout: float = 60.0  # seconds a download may stall before it is given up


def check(folder, files=FILES):
    """{name: "ok" | "missing" | "differs (...)"} for every file of `files` in `folder`."""
    status = {}
    for name, (_, size, digest) in files.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            status[name] = "missing"
        elif os.path.getsize(path) != size or sha256(path) != digest:
            status[name] = f"differs (size {os.path.getsize(path)}, expected {size}; sha256 {sha256(path)[:12]}..., " \
                           f"expected {digest[:12]}...)"
        else:
            status[name] = "ok"
    return status


def download(name, url, size, digest, folder, timeout):
    """One file to folder/name through folder/name.part, renamed only when its sha256 is the pinned
    one. DataError naming the URL when it cannot be fetched or is not the expected file."""
    path, part = os.path.join(folder, name), os.path.join(folder, name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(part):
            os.remove(part)
        raise DataError(f"{name}: cannot download {url} ({getattr(e, 'reason', e)})") from None
    got = sha256(part)
    if os.path.getsize(part) != size or got != digest:
        os.remove(part)
        raise DataError(f"{name}: {url} is not the expected file (sha256 {got}, expected {digest}); "
                        "nothing written")
    os.replace(part, path)


def main(cfg, files=FILES):
    """Checks (--check) or fills (--out_dir) a data folder; returns {name: status}. SystemExit 1 when
    a checked file is missing or differs, or a file already in --out_dir differs (it is kept)."""
    folder = cfg.check or cfg.out_dir
    if cfg.check and not os.path.isdir(folder):
        raise DataError(f"--check {folder}: not a directory")
    if not cfg.check:
        writable_dir(folder)
        for name, (url, size, digest) in files.items():
            if not os.path.exists(os.path.join(folder, name)):
                print(f"{name}: {url}", flush=True)
                download(name, url, size, digest, folder, cfg.timeout)
    status = check(folder, files)
    for name, s in status.items():
        print(f"  {name:<26} {s}")
    bad = [n for n, s in status.items() if s != "ok"]
    if bad:
        raise SystemExit(f"error: {len(bad)} of {len(files)} files in {folder} are missing or differ from their "
                         f"public source: {', '.join(bad)}" + ("" if cfg.check else " (a file already there is "
                                                                "never overwritten: move it away and rerun)"))
    print(f"all {len(files)} files in {folder} are byte-identical to their public sources")
    return status


if __name__ == "__main__":
    _, given = parse_flags(Config, __doc__)
    try:
        main(Config(**given))
    except DataError as e:
        raise SystemExit(f"error: {e}")
