"""The built-in synthetic task and tiny model: SSFT on a laptop, with nothing downloaded.

Each question asks for a sum, of one of two kinds: three two-digit numbers from 10..29 ("Add
28+19+11.", kind "tens") or five one-digit numbers from 1..9 ("Add 2+5+2+8+8.", kind "ones"), half
of the questions each. The most accurate style differs between the kinds, so the best tag depends
on the question: what a per-question choice of tag (GFPO) can learn and a global prior cannot. Four
"teachers" solve it in four styles that differ in structure, in length and in how they compute, so
that their errors are not the same errors, like the distinct reasoning modes of the paper's
teachers (Section 3.3):

    left    Left to right: 28+19=47, 47+11=58. The answer is \\boxed{58}.
    right   Right to left: 11+19=30, then 30+28=58. The answer is \\boxed{58}.
    place   By place value: ones 8+9+1=18, carry 1, tens 2+1+1+1=5, so 58. The answer is \\boxed{58}.
    direct  Directly: The answer is \\boxed{58}.

Left and right are running sums with different partial sums; place value adds single digits with an
explicit carry; direct answers at once (and is the least accurate, as answering without reasoning
is). Every question gets 4 traces: one per style in a random order, and in a quarter of the
questions one style repeated in place of another (the paper's mixed data also repeats teachers).
`recognise` maps any generated text to the style whose whole structure it follows, or to "other".

The operands are small and fixed-width so that the tiny model learns to copy them from the prompt
and add them within minutes of CPU training: held-out accuracy is learned, not at chance.
Of the possible questions, one in eight is held out (`is_held_out`): training never draws it,
whatever the seed, and every evaluation (infer.py --data toy, toy_compare.py) uses only those.

The model is a tiny Qwen2 built from a config, with a byte-level BPE tokenizer trained in-process
on the task text with Qwen's own pre-tokenizer regex (digits split one by one), so nothing is
downloaded and the same code path as Qwen2.5 (chat template, spare embedding rows) is exercised.
`TRAIN_DEFAULTS` are the flags train.py uses with --model toy.

    python train.py                  # SSFT on this task (train.py's defaults are these)
    python tools/toy_compare.py      # hungarian vs random vs sft on it (Section 3.3, Table 1)
    python gfpo.py --model out/ssft/final   # GFPO on its training questions (gfpo.py's defaults are GFPO_DEFAULTS)
"""
import random
import re
import zlib

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

STYLES = ["left", "right", "place", "direct"]
TRACES_PER_QUESTION = 4
REPEAT_PROB = 0.25  # fraction of questions in which one style appears twice
LOW, HIGH = 10, 29  # operand range: two digits each, so every digit sits at a fixed position
KINDS = {"tens": (3, LOW, HIGH), "ones": (5, 1, 9)}  # question kind: (operands, lowest, highest)
ONES_SHARE = 0.5  # fraction of questions of the kind "ones"
HELD_OUT_SEED = 10_000  # seed of the held-out questions (infer.py --data toy, toy_compare.py)

# train.py's defaults for --model toy: 500 steps of 64 sequences, the run toy_compare.py makes of each variant.
# The batch layout is the readable one (a row per matched pair, as Eq. 5 reads); --layout concat (Appendix A.5)
# computes each prompt once per question instead of once per trace and runs faster (README).
TRAIN_DEFAULTS = dict(num_forks=4, match_tokens=4, epochs=4, lr=3e-3, batch_size=64, layout="batch", micro_batch=32,
                      match_batch=256, max_len=256, activation_checkpointing=False, save_every=0)

# gfpo.py's defaults for --data toy: 40 steps of 16 questions x 8 tags move the choice towards the most accurate tag;
# lr 1e-5 keeps every forced tag's accuracy (at 3e-5 some fell by 4 to 9 points, at 3e-4 all collapsed; README, GFPO).
GFPO_DEFAULTS = dict(steps=40, batch_size=16, group_size=8, lr=1e-5, max_new_tokens=64, micro_batch=16,
                     activation_checkpointing=False, save_every=0)

# Qwen2's pre-tokenizer regex: the reloaded Qwen2Tokenizer rebuilds exactly this split.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def solve(numbers, style):
    """The trace of one style for `numbers` (three or more ints)."""
    total = sum(numbers)
    end = f"The answer is \\boxed{{{total}}}."
    sums = [sum(numbers[:k + 1]) for k in range(len(numbers))]
    if style == "left":  # a running sum from the first operand
        steps = (f"{s}+{n}={s + n}" for s, n in zip(sums, numbers[1:]))
        return "Left to right: " + ", ".join(steps) + f". {end}"
    if style == "right":  # a running sum from the last operand: other partial sums, other errors
        back = numbers[::-1]
        steps = [f"{sum(back[:k + 1])}+{n}={sum(back[:k + 2])}" for k, n in enumerate(back[1:])]
        return "Right to left: " + ", then ".join(steps) + f". {end}"
    if style == "place":  # column addition: one-digit sums and an explicit carry
        ones = sum(n % 10 for n in numbers)
        tens = sum(n // 10 for n in numbers) + ones // 10
        digits = ["+".join(str(n // 10 ** place % 10) for n in numbers) for place in (0, 1)]
        return (f"By place value: ones {digits[0]}={ones}, carry {ones // 10}, "
                f"tens {digits[1]}+{ones // 10}={tens}, so {total}. {end}")
    if style == "direct":
        return f"Directly: {end}"
    raise ValueError(f"unknown style {style!r}")


STYLE_PATTERNS = {
    "left": r"Left to right: \d+\+\d+=\d+(, \d+\+\d+=\d+)+\. ",
    "right": r"Right to left: \d+\+\d+=\d+(, then \d+\+\d+=\d+)+\. ",
    "place": r"By place value: ones \d(\+\d)+=\d+, carry \d, tens \d(\+\d)+=\d+, so \d+\. ",
    "direct": r"Directly: ",
}


def recognise(text):
    """The style whose whole structure `text` follows, or "other"."""
    for style, pattern in STYLE_PATTERNS.items():
        if re.fullmatch(pattern + r"The answer is \\boxed\{\d+\}\.", text.strip()):
            return style
    return "other"


def kind_of(prompt):
    """The question kind of a prompt ("Add 28+19+11." -> "tens", "Add 2+5+2+8+8." -> "ones")."""
    count = prompt.count("+") + 1
    return next(kind for kind, (operands, _, _) in KINDS.items() if operands == count)


def is_held_out(prompt):
    """One question in eight, fixed by its text (a CRC, the same on every machine): evaluation only."""
    return zlib.crc32(prompt.encode()) % 8 == 0


def make_questions(num_questions, seed, held_out=False):
    """Rows in data.py's canonical layout: prompt, traces, answer, sources (the styles). Training
    questions (the default) are never held-out ones, and held-out ones never training ones."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < num_questions:
        kind = "ones" if rng.random() < ONES_SHARE else "tens"
        numbers = [rng.randint(*KINDS[kind][1:]) for _ in range(KINDS[kind][0])]
        styles = STYLES[:]
        rng.shuffle(styles)
        if rng.random() < REPEAT_PROB:
            styles[rng.randrange(4)] = rng.choice(STYLES)
        prompt = "Add " + "+".join(map(str, numbers)) + "."
        if is_held_out(prompt) == held_out:
            rows.append({"prompt": prompt, "traces": [solve(numbers, s) for s in styles[:TRACES_PER_QUESTION]],
                         "answer": str(sum(numbers)), "sources": styles[:TRACES_PER_QUESTION]})
    return rows


def held_out_questions(num_questions):
    """The toy's one evaluation set: distinct held-out questions (at most 1,000 exist)."""
    rows, seen = [], set()
    for q in make_questions(8 * num_questions, HELD_OUT_SEED, held_out=True):
        if q["prompt"] not in seen and len(rows) < num_questions:
            rows.append(q)
            seen.add(q["prompt"])
    return rows


def training_records(num_questions, seed):
    """[(where, row)] of training questions as a file reader gives them: what gfpo.py --data toy
    reads (plumbing/evalfiles.load_problems)."""
    return [(f"toy:{i + 1}", {"prompt": q["prompt"], "answer": q["answer"], "id": i})
            for i, q in enumerate(make_questions(num_questions, seed))]


def held_out_records(num_questions):
    """[(where, row)] of the held-out questions as a file reader gives them: what infer.py --data toy
    reads (plumbing/evalfiles.load_problems)."""
    return [(f"toy:{i + 1}", {"prompt": q["prompt"], "answer": q["answer"], "id": i})
            for i, q in enumerate(held_out_questions(num_questions))]


def train_defaults(layout=None):
    """TRAIN_DEFAULTS, for another --layout if given: a micro-batch of the batch layout holds 32
    sequences, one of the concat layout whole questions of 4 traces (8 = the same 32 sequences)."""
    if layout in (None, TRAIN_DEFAULTS["layout"]):
        return TRAIN_DEFAULTS
    return {**TRAIN_DEFAULTS, "layout": layout, "micro_batch": TRAIN_DEFAULTS["micro_batch"] // TRACES_PER_QUESTION}


def gfpo_defaults(trainable=None):
    """GFPO_DEFAULTS, for --trainable tag_rows with lr 1e-3: only the tags' output rows move and no
    response can change, so the step that would damage the responses under "all" is safe, and lr
    1e-5 would move those N rows by about 4e-4 in 40 steps: nothing."""
    return {**GFPO_DEFAULTS, "lr": 1e-3} if trainable == "tag_rows" else GFPO_DEFAULTS


def make_tokenizer(vocab_size=400):
    """A byte-level BPE tokenizer trained on the task's text, with a Qwen-style chat template. 400
    entries make the template's words ("user", "assistant") and the styles' words single tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + " " + " ".join(r["traces"]) for r in make_questions(2000, seed=12345)]
    corpus += ["user assistant system\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(tokenizer, hidden=128, layers=2, spare_rows=16):
    """A random-init tiny Qwen2 (342k parameters). The embedding gets spare rows (as Qwen2.5
    checkpoints do), so adding the forking tokens uses them instead of resizing. The MLP is 2x
    hidden: on 2 CPU cores it trained a quarter faster than a 4x MLP and reached the same held-out
    accuracy on the two seeds compared."""
    config = Qwen2Config(vocab_size=len(tokenizer) + spare_rows, hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config)


