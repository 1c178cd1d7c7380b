"""Fixtures shared by the test files: a world of one process, tiny models with forking tokens, and the
real Qwen2.5 vocabulary (`qwen`), built offline by tools/qwen_vocab.py."""
import hashlib
import json
import os
import sys
import subprocess

import pytest
import torch
import torch.distributed as dist

import data
import toy
from qwen_vocab import QWEN25_ADDED, QWEN25_TEMPLATE, qwen_tokenizer


HERE = os.path.dirname(os.path.abspath(__file__))  # the repository root
SHARED = os.path.join(HERE, "..", "shared", "data")  # the evaluation and example files (docs/data.md)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def losses(out_dir):
    """The loss of every step a run logged in out_dir/metrics.jsonl."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def pytest_configure(config):
    # torch.compile (transformers compiles flex_attention even on the CPU) imports torch.utils.mkldnn,
    # whose 14 methods use torch.jit.script_method: torch 2.13 warns once per method, from its own
    # module, at import. Nothing the project calls; every other warning is still shown.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:"
                                              "DeprecationWarning:torch.jit._script")


def tiny_model(num_forks, hidden=32):
    """Toy tokenizer + fp32 tiny Qwen2 (eval mode) with forking tokens whose embeddings differ
    markedly, so that the rows of a cost matrix differ. Returns (tokenizer, model, fork_ids)."""
    torch.manual_seed(0)
    tok = toy.make_tokenizer()
    model = toy.make_model(tok, hidden=hidden)
    num_trained = len(tok)
    fork_ids = data.add_fork_tokens(tok, num_forks)
    data.init_fork_rows(model, fork_ids, num_trained, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[fork_ids] += torch.randn(num_forks, hidden)
    return tok, model.eval(), fork_ids


@pytest.fixture(scope="session")
def tiny():
    return tiny_model(4)


@pytest.fixture(scope="session")
def world_of_one():
    """A world of one process, so that train.py's passes (which all-reduce) run in-process."""
    if not dist.is_initialized():  # as ranks.init_distributed makes it, but owned by the tests
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    yield


@pytest.fixture(scope="session")
def run():
    """run(cmd, timeout=...) -> CompletedProcess of a command in the repository, output captured."""
    def run(cmd, timeout=240, **kw):
        return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout, **kw)
    return run


@pytest.fixture(scope="session")
def sdpa_and_flex_models():
    """build(hidden, device) -> two tiny Qwen2 models with the same weights: SDPA attention and
    FlexAttention (the concat layout's attention on CUDA)."""
    def build(hidden, device):
        torch.manual_seed(0)
        sdpa = toy.make_model(toy.make_tokenizer(), hidden=hidden).to(device)
        flex_cfg = sdpa.config.__class__(**sdpa.config.to_dict())
        flex_cfg._attn_implementation = "flex_attention"
        flex = type(sdpa)(flex_cfg).to(device)
        flex.load_state_dict(sdpa.state_dict())
        return sdpa, flex
    return build


# ----------------------------------------------------------------------------- the real Qwen2.5 vocabulary

@pytest.fixture(scope="session")
def qwen(request, tmp_path_factory):
    """The Qwen2.5 tokenizer of `qwen_tokenizer()`, built once (12 s) and kept in pytest's cache
    (in a temporary folder when the cache is off: -p no:cacheprovider)."""
    from transformers import PreTrainedTokenizerFast
    key = hashlib.sha256(f"{QWEN25_ADDED}{QWEN25_TEMPLATE}{toy.QWEN_SPLIT}".encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)
    path = cache.mkdir(f"qwen25-tokenizer-{key}") if cache else tmp_path_factory.mktemp("qwen25-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        qwen_tokenizer().save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)
