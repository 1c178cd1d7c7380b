"""Fixtures shared by the test files: a world of one process and tiny models with forking tokens."""
import os
import subprocess

import pytest
import torch
import torch.distributed as dist

import data
import toy

HERE = os.path.dirname(os.path.abspath(__file__))


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
    if not dist.is_initialized():  # as common.init_distributed makes it, but owned by the tests
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
