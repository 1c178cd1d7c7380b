"""Forking tokens, text and token ids: what one training sequence is (Section 2, Appendix A.1).

A question has one prompt x and M reasoning traces y_1..y_M (M varies per question). Every
training sequence is (prompt, forking tag g_i, trace), built by one function, `build_text`:

    chat_template(user: prompt, add_generation_prompt=True) + tag(i) + trace + eos

The tag has two styles (--fork_style), both a "special token (or a sequence of tokens) g that
initiates reasoning" (Section 2):
    special  "<think{i}>", one reserved token added to the vocabulary (the default)
    text     "<|im_start|><think{i}>\\n" as ordinary text, nothing added: the format of the authors'
             released checkpoint and evaluation code
For a Qwen2.5 tokenizer and the special style that is exactly

    <|im_start|>system\\nYou are Qwen, ...<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n<think3>{trace}<|im_end|>

(newlines shown as \\n; no space around the tag; no chat template: "Question: {prompt}\\nAnswer: ").
Only trace tokens and the closing eos carry loss (Eq. 1-2). Data files (JSONL, Parquet, their
layouts) and the pool-to-mixed recipe: plumbing/datafiles.py.

    python data.py --data ../shared/data/math_cot_100x8.jsonl --model toy  # a file's statistics
    python data.py mix --pool gpt_oss.jsonl s1k.parquet claude.jsonl --traces 4 --per_source 2 \\
        --correct_only --seed 0 --out s1k_4mixed.jsonl                     # s1k-4mixed (A.3.1)
"""
import torch

from plumbing import concat, datafiles, files
from plumbing.batching import IGNORE
from plumbing.files import DataError

FORK_TOKEN = "<think{}>"  # <think1> ... <thinkN>: the global forking tokens g_1..g_N
TEXT_TAG = "<|im_start|>{}\n"  # --fork_style text: the tag around a token's name, as plain text
FORK_STYLES = ("special", "text")
FALLBACK_PROMPT = "Question: {}\nAnswer: "


# ----------------------------------------------------------------------------- forking tokens

def fork_tokens(num_forks):
    return [FORK_TOKEN.format(i + 1) for i in range(num_forks)]


def fork_tag(name, style):
    """The text of forking token `name` ("<think3>") in a style: "<think3>" or
    "<|im_start|><think3>\\n"."""
    return TEXT_TAG.format(name) if style == "text" else name


def count_fork_tokens(tokenizer):
    """N of a tokenizer that holds <think1>..<thinkN> (0 for one without forking tokens)."""
    added, n = tokenizer.get_added_vocab(), 0
    while FORK_TOKEN.format(n + 1) in added:
        n += 1
    return n


def fork_ids(tokenizer, num_forks, style="special"):
    """The token ids of each forking tag, [[ids of g_1], ..., [ids of g_N]]: one reserved special
    token each (added to the tokenizer by add_fork_tokens), or for style "text" the ordinary tokens
    of "<|im_start|><think{i}>\\n" (nothing added; for Qwen2.5 and i < 10 the 5 tokens <|im_start|>,
    <th, ink, i, >\\n). DataError when the tokenizer cannot express the style."""
    if style == "special":
        return [[i] for i in add_fork_tokens(tokenizer, num_forks)]
    if style != "text":
        raise DataError(f"--fork_style must be one of {', '.join(FORK_STYLES)} (got {style!r})")
    start = tokenizer.encode("<|im_start|>", add_special_tokens=False)
    if len(start) != 1 or start[0] == tokenizer.unk_token_id:
        raise DataError("--fork_style text needs a ChatML tokenizer, in which <|im_start|> is one "
                        "token (Qwen2.5)")
    return [tokenizer.encode(fork_tag(name, "text"), add_special_tokens=False)
            for name in fork_tokens(num_forks)]


def add_fork_tokens(tokenizer, num_forks):
    """Registers <think1>..<thinkN> as special tokens (never split, kept by save_pretrained).
    Returns their ids. A string that is already in the vocabulary keeps its id."""
    names = fork_tokens(num_forks)
    tokenizer.add_special_tokens({"additional_special_tokens": names},
                                 replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(names)
    for name, i in zip(names, ids):
        assert tokenizer.encode(name, add_special_tokens=False) == [i], f"{name} is not one token"
    return ids


def init_fork_rows(model, fork_ids, num_trained, seed):
    """Initialises the forking tokens' embedding rows (input and, if untied, output): the mean of
    the first `num_trained` rows (in-distribution) plus a tiny seeded noise (so that the first
    matchings are not decided by tie-breaking). Qwen2.5's spare rows (152064 for ~151665 tokens)
    are used as they are, keeping the shapes serving engines read; only ids past them resize."""
    if max(fork_ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(max(fork_ids) + 1, pad_to_multiple_of=64, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        for emb in [inputs] if outputs is inputs else [inputs, outputs]:  # tied: one matrix
            trained = emb[:num_trained].float()
            noise = torch.randn(len(fork_ids), emb.shape[1], generator=g) * trained.std() * 1e-2
            emb[fork_ids] = (trained.mean(0) + noise).to(emb.dtype)


# ----------------------------------------------------------------------------- text and tokens

def prompt_text(tokenizer, prompt):
    """Everything before the forking token."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return FALLBACK_PROMPT.format(prompt)


def encode_prompt(tokenizer, prompt):
    """Token ids of prompt_text, the template's own rendering (a template that trims the message, as
    Llama 3 and Qwen3.5 do, drops a trailing newline here too), with the user's prompt tokenised as
    text: a "<think1>" or "<|im_end|>" typed in a question stays plain text, and control tokens come
    only from the chat template and the forking token. For an ordinary prompt the ids equal those of
    prompt_text; a template that changes more than the message is tokenised whole."""
    text, marker = prompt_text(tokenizer, prompt), "\x00PROMPT\x00"
    pieces = prompt_text(tokenizer, marker).split(marker)
    if len(pieces) != 2 or not (text.startswith(pieces[0]) and text.endswith(pieces[1])) \
            or len(pieces[0]) + len(pieces[1]) > len(text):
        return tokenizer.encode(text, add_special_tokens=False)
    head, tail = pieces
    return (tokenizer.encode(head, add_special_tokens=False)
            + tokenizer.encode(text[len(head):len(text) - len(tail)], add_special_tokens=False,
                               split_special_tokens=True)
            + tokenizer.encode(tail, add_special_tokens=False))


def build_text(tokenizer, prompt, tag, trace=""):
    """The one string of (prompt, forking tag, trace) used by training, matching and inference; tag
    is fork_tag's text. With trace="" it is the inference prompt; a training trace ends with eos."""
    return prompt_text(tokenizer, prompt) + tag + (trace + tokenizer.eos_token if trace else "")


def encode_question(tokenizer, q, max_len, tag_len=1, layout="batch"):
    """Token ids of one question: {"prompt_ids", "trace_ids": [...], "truncated": int}. The prompt,
    tag and each trace tokenised apart give `build_text`'s ids (a special token splits, a text tag
    ends in a newline), the M traces sharing one prompt. Traces are cut so that prompt + tag + trace
    <= max_len for tags of <= `tag_len` tokens; under concat, prompt + M x (tag + trace) (the room
    shared out evenly, concat.concat_room). DataError naming the question when a prompt leaves none.
    """
    prompt_ids, where = encode_prompt(tokenizer, q["prompt"]), q.get("where", "a question")
    room = max_len - len(prompt_ids) - tag_len
    if room < 1:
        raise DataError(f"{where}: a prompt of {len(prompt_ids)} tokens leaves no room for a trace "
                        f"under --max_len {max_len}: {q['prompt'][:60]!r}")
    # each trace closed by eos; a literal "<think1>" or "<|im_end|>" inside a trace stays plain text
    trace_ids = [tokenizer.encode(t, add_special_tokens=False, split_special_tokens=True)
                 + [tokenizer.eos_token_id] for t in q["traces"]]
    rooms = [room] * len(trace_ids) if layout == "batch" else \
        concat.concat_room([len(t) for t in trace_ids],
                           max_len - len(prompt_ids) - tag_len * len(trace_ids))
    if min(rooms, default=1) < 1:
        raise DataError(f"{where}: a prompt of {len(prompt_ids)} tokens leaves no room for "
                        f"{len(trace_ids)} traces in one --layout concat row of --max_len "
                        f"{max_len}: {q['prompt'][:60]!r}")
    truncated = sum(len(ids) > r for ids, r in zip(trace_ids, rooms))
    return {"prompt_ids": prompt_ids, "trace_ids": [ids[:r] for ids, r in zip(trace_ids, rooms)],
            "truncated": truncated}


def make_sequence(prompt_ids, tag_ids, trace_ids, max_trace_tokens=None):
    """(input_ids, labels) of prompt + tag + trace; labels only on the first `max_trace_tokens`
    trace tokens (all of them by default). The prompt and the forking tag carry no loss."""
    trace_ids = trace_ids[:max_trace_tokens]
    input_ids = prompt_ids + tag_ids + trace_ids
    labels = [IGNORE] * (len(prompt_ids) + len(tag_ids)) + trace_ids
    return input_ids, labels


def main(argv):
    """python data.py --data FILE [--model M]: the file's questions, traces per source and, with a
    tokenizer, token lengths; python data.py mix ...: the pool-to-mixed recipe (datafiles.mix)."""
    if argv[:1] == ["mix"]:
        return datafiles.mix_main(argv[1:])

    def load_tokenizer(model):
        import toy
        return toy.make_tokenizer() if model == "toy" else files.load_tokenizer(model)
    datafiles.check_main(argv, __doc__, load_tokenizer, prompt_text)


if __name__ == "__main__":
    import sys
    try:
        main(sys.argv[1:])
    except DataError as e:
        raise SystemExit(f"error: {e}")
