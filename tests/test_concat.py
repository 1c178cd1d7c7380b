"""Tests of the concat layout (Appendix A.5, plumbing/concat.py): the tree mask, isolated branches,
FlexAttention's BlockMask, and losses and gradients equal to the batch layout's. CPU.
"""
import math
import sys

import numpy as np
import torch

import data
import match
import toy
import train
from plumbing import batching, concat

from conftest import losses


def test_tree_mask_matches_its_definition():
    rows = [concat.make_branches([1, 2, 3], [([7], [4, 5]), ([8], [6]), ([9], [4, 4, 4])]),
            concat.make_branches([1], [([7], [5])]), batching.pad_item(0, "concat")]
    _, _, position_ids, branch_ids = concat.collate_branches(rows, pad_id=0)
    mask = concat.tree_mask(branch_ids)
    for b in range(len(rows)):
        for q in range(branch_ids.shape[1]):
            for k in range(branch_ids.shape[1]):
                bq, bk = int(branch_ids[b, q]), int(branch_ids[b, k])
                if bq == -1:
                    allowed = k <= q and bk == -1  # padding sees earlier padding only
                else:
                    allowed = k <= q and (bk == 0 or bk == bq)  # the prompt or its own branch
                assert bool(mask[b, 0, q, k]) == allowed
    assert position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 3, 4, 5, 6]  # branches restart after the prompt


def test_concat_branches_are_isolated(tiny):
    tok, model, fork_ids = tiny
    prompt = [5, 6, 7, 8]
    a = [([fork_ids[0]], [20, 21, 22]), ([fork_ids[1]], [30, 31, 32, 33]), ([fork_ids[2]], [40, 41])]
    b = [a[0], ([fork_ids[1]], [90, 91, 92, 93]), a[2]]  # branch 2 changed
    logits = []
    for branches in (a, b):
        input_ids, _, position_ids, branch_ids = concat.collate_branches([concat.make_branches(prompt, branches)], 0)
        with torch.no_grad():
            logits.append(model(input_ids=input_ids, attention_mask=concat.tree_mask(branch_ids),
                                position_ids=position_ids).logits[0])
    other = (branch_ids[0] != 2)
    torch.testing.assert_close(logits[0][other], logits[1][other], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0][~other], logits[1][~other])
    alone = torch.tensor([prompt + [fork_ids[2], 40, 41]])  # a branch equals the sequence it stands for
    with torch.no_grad():
        torch.testing.assert_close(model(alone).logits[0, 4:], logits[0][branch_ids[0] >= 0][-3:], rtol=1e-5, atol=1e-5)


def test_flex_attention_block_mask_equals_dense_mask_forward(sdpa_and_flex_models):
    """FlexAttention (the CUDA path) against SDPA with the dense mask, forward on the CPU (the
    backward on CUDA is in test_gpu.py)."""
    sdpa, flex = sdpa_and_flex_models(32, "cpu")
    rows = [concat.make_branches([1, 2, 3], [([7], list(range(20, 40))), ([8, 9], list(range(50, 61)))]),
            concat.make_branches([1, 2], [([9], [4, 5, 6])])]
    input_ids, _, position_ids, branch_ids = concat.collate_branches(rows, pad_id=0)
    with torch.no_grad():
        dense = sdpa(input_ids=input_ids, attention_mask=concat.tree_mask(branch_ids), position_ids=position_ids).logits
        block = flex(input_ids=input_ids, attention_mask=concat.tree_block_mask(branch_ids),
                     position_ids=position_ids).logits
    real = branch_ids >= 0
    torch.testing.assert_close(block[real], dense[real], rtol=1e-5, atol=1e-5)


def test_concat_layout_loss_and_gradients_equal_batch_layout(world_of_one):
    cfg = train.parse_config(["--toy_questions=4", "--micro_batch=2", "--match_batch=8", "--max_len=40"])
    tok, fork_ids, num_trained = train.load_tokenizer(cfg)
    model, _ = train.load_model(cfg, tok, fork_ids, num_trained, 0, torch.device("cpu"))
    questions = toy.make_questions(4, seed=1)
    questions[0]["traces"] = questions[0]["traces"][:1]
    questions[1]["traces"] = questions[1]["traces"][:3]
    questions[2]["traces"][0] += " and some more words to cut" * 5  # truncated at --max_len
    encoded = [data.encode_question(tok, q, cfg.max_len) for q in questions]
    assert sum(e["truncated"] for e in encoded) >= 1
    rngs = [np.random.default_rng(q) for q in range(4)]
    matched = match.match_questions(model, encoded, fork_ids, cfg.matching, cfg.match_tokens, cfg.match_batch,
                                    tok.pad_token_id, torch.device("cpu"), rngs)
    results = []
    for layout in ("batch", "concat"):
        rows = train.training_rows(encoded, matched, fork_ids, layout)
        loss, tokens, _, _ = train.training_pass(model, rows, cfg.micro_batch, layout, tok.pad_token_id,
                                                 torch.device("cpu"))
        results.append((loss, tokens, {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (loss_b, tokens_b, grads_b), (loss_c, tokens_c, grads_c) = results
    assert tokens_b == tokens_c and math.isclose(loss_c, loss_b, rel_tol=1e-5)
    for name, grad in grads_b.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-7)


def test_concat_and_batch_commands_log_the_same_first_loss(tmp_path, run):
    first = []
    for layout in ("batch", "concat"):
        result = run([sys.executable, "train.py", "--layout", layout, "--max_steps", "2", "--toy_questions", "32",
                      "--out_dir", str(tmp_path / layout)])
        assert result.returncode == 0 and f"{layout} layout" in result.stdout, result.stderr
        first.append(losses(tmp_path / layout)[0])
    assert math.isclose(first[0], first[1], rel_tol=1e-5)
