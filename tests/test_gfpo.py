"""Tests of GFPO (gfpo.py), its policy (policy.py) and infer.py --fork auto: CPU, seconds each.

    python -m pytest -q test_gfpo.py
"""
import copy
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import gfpo
import match
import policy
import toy
from plumbing import evalfiles, fsdp


def direct_tag_log_probs(model, prompt_ids, fork_ids):
    """log p(g_i | x) by definition: one full forward of prompt + tag per tag, the log-softmax of
    the logits summed over the tag's tokens."""
    out = []
    for tag in fork_ids:
        ids = torch.tensor([prompt_ids + tag])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        out.append(sum(logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(tag)))
    return torch.stack(out)


@pytest.mark.parametrize("style", ["special", "text"])
def test_policy_equals_a_direct_computation_from_the_logits(tiny, style):
    tok, model, _ = tiny
    fork_ids = data.fork_ids(tok, 4, style)
    assert (len(fork_ids[0]) == 1) == (style == "special")
    prompts = [data.encode_prompt(tok, p) for p in ("Add 11+12+13.", "Add 28+19+11 and then some more words.")]
    with torch.no_grad():
        got = policy.tag_log_probs(match.SequenceNLL(model), prompts, fork_ids, tok.pad_token_id, "cpu")
        expected = torch.stack([direct_tag_log_probs(model, p, fork_ids) for p in prompts])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    pi = policy.log_policy(got).exp()
    torch.testing.assert_close(pi, torch.softmax(expected, -1), atol=1e-5, rtol=1e-4)
    assert torch.allclose(pi.sum(-1), torch.ones(2)) and pi.std() > 0  # the tags differ


def test_group_advantages_on_a_hand_made_group():
    rewards = torch.tensor([[1., 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    scaled = gfpo.group_advantages(rewards, scale=True, eps=0.0)
    # row 0: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2
    torch.testing.assert_close(scaled[0], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    assert scaled[1].abs().max() == 0 == scaled[2].abs().max()  # all equal: no signal (not NaN)
    torch.testing.assert_close(scaled[3], torch.tensor([1., 1, -1, -1]) * 0.5 / (1 / 3) ** 0.5)
    centred = gfpo.group_advantages(rewards, scale=False)
    torch.testing.assert_close(centred[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(gfpo.group_advantages(rewards, True, 1e-4).sum(1), torch.zeros(4), atol=1e-6)


def test_kl_to_start_is_exact_against_a_direct_sum():
    g = torch.Generator().manual_seed(0)
    logpi, logstart = (policy.log_policy(torch.randn(5, 6, generator=g) * 2) for _ in range(2))
    direct = torch.tensor([sum(p.exp() * (p - q) for p, q in zip(row, start)) for row, start in zip(logpi, logstart)])
    torch.testing.assert_close(policy.kl_to_start(logpi, logstart), direct)
    assert (direct > 0).all() and policy.kl_to_start(logpi, logpi).abs().max() < 1e-6
    torch.testing.assert_close(policy.entropy(policy.log_policy(torch.zeros(1, 6))), torch.tensor([6.0]).log())


def update_inputs(model, tok, advantages, beta, logpi_start=None):
    """gfpo.policy_update on two toy questions: (the gradients, the rows the model saw)."""
    fork_ids = data.fork_ids(tok, 4, "special")
    prompts = [data.encode_prompt(tok, p) for p in ("Add 11+12+13.", "Add 28+19+11.")]
    lm = copy.deepcopy(model).train()
    nll = match.SequenceNLL(lm)
    seen = []
    nll.register_forward_pre_hook(lambda m, args, kw: seen.extend(r[r != tok.pad_token_id].tolist()
                                                                 for r in kw.get("input_ids", args[0] if args else None)),
                                  with_kwargs=True)
    if logpi_start is None:
        with torch.no_grad():
            logpi_start = policy.log_policy(policy.tag_log_probs(nll, prompts, fork_ids, tok.pad_token_id, "cpu"))
        seen.clear()
    tags = torch.tensor([[0, 1, 2, 2], [3, 3, 0, 1]])
    gfpo.policy_update(nll, prompts, tags, advantages, logpi_start, fork_ids, beta, 1.0, 2, 1, tok.pad_token_id, "cpu")
    grads = [p.grad for p in lm.parameters() if p.grad is not None]
    return grads, seen, prompts, fork_ids


def test_the_loss_has_zero_gradient_when_all_advantages_are_zero(tiny):
    tok, model, _ = tiny
    zero = torch.zeros(2, 4)
    for beta in (0.0, 0.5):  # with beta > 0 at the start policy: KL is at its minimum
        grads, _, _, _ = update_inputs(model, tok, zero, beta)
        assert grads and all(g.abs().max() < 1e-6 for g in grads), beta
    grads, _, _, _ = update_inputs(model, tok, torch.tensor([[1., -1, 0, 0], [0, 0, 0, 0]]), 0.0)
    assert max(g.abs().max() for g in grads) > 1e-4  # a signal moves the model


def test_the_update_runs_over_prompts_and_tags_only_never_the_responses(tiny):
    """Every row the update's forward sees is some prompt + one tag: the responses never enter, so
    the loss cannot change when they do."""
    tok, model, _ = tiny
    _, seen, prompts, fork_ids = update_inputs(model, tok, torch.tensor([[1., -1, 0, 0], [0.5, -0.5, 0, 0]]), 0.1)
    assert sorted(seen) == sorted(p + t for p in prompts for t in fork_ids)


def test_rollouts_on_the_fsdp_model_equal_those_of_the_plain_model(tiny, world_of_one):
    """gfpo.rollouts decodes with the sharded model's root gathered (model.unshard): the same tags,
    responses and rewards as on an unsharded copy."""
    tok, model, _ = tiny
    fork_ids = data.fork_ids(tok, 4, "special")
    qs = toy.make_questions(2, seed=3)
    prompts = [data.encode_prompt(tok, q["prompt"]) for q in qs]
    golds = [{"gold": q["answer"], "kind": "math"} for q in qs]
    cfg = gfpo.Config(group_size=4, max_new_tokens=6, micro_batch=1, temperature=0.7)
    outs = []
    for sharded in (False, True):
        lm = copy.deepcopy(model)
        nll = fsdp.shard(lm, torch.device("cpu"), match.SequenceNLL) if sharded else match.SequenceNLL(lm)
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        outs.append(gfpo.rollouts(nll, prompts, golds, fork_ids, generators, cfg, {tok.eos_token_id},
                                  tok.pad_token_id, tok, torch.device("cpu")))
    for key in ("tags", "rewards", "tokens"):
        assert torch.equal(outs[0][key], outs[1][key]), key
    torch.testing.assert_close(outs[0]["logpi"], outs[1]["logpi"])
    assert outs[0]["tokens"].sum() > 0


# ----------------------------------------------------------------------------- whole runs

# A stand-in for decoding on a tiny random model, whose own answers are never right: under <think3>
# the answer is right 4 times in 5, under the other tags 1 in 5 (draws from the question's generator).
RUN = r"""
import os, re, signal, sys, torch
import gfpo
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
best = tok.convert_tokens_to_ids("<think3>")
calls = []
def generate(model, prefix_ids, starts, max_new_tokens, temperature, top_p, stop_ids, generator, batch_size=0):
    total = sum(map(int, re.findall(r"\d+", tok.decode(prefix_ids).split("Add")[-1])))
    right = torch.rand(len(starts), generator=generator) < torch.tensor([0.8 if s == [best] else 0.2 for s in starts])
    return [(tok.encode(f"The answer is \\boxed{{{total if r else 0}}}."), True) for r in right.tolist()]
gfpo.decoding.generate = generate
real = gfpo.rollouts
def rollouts(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(sys.argv[1]):  # a scheduler's SIGTERM during this step
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
gfpo.rollouts = rollouts
gfpo.main(gfpo.parse_config(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def ssft_dir(tmp_path_factory):
    """An SSFT-like final/ directory: a tiny model with <think1>..<think4> initialised as train.py
    does (pi near uniform) and its ssft.json."""
    torch.manual_seed(0)
    tok = toy.make_tokenizer()
    model = toy.make_model(tok, hidden=32)
    num_trained = len(tok)
    data.init_fork_rows(model, data.add_fork_tokens(tok, 4), num_trained, seed=0)
    path = tmp_path_factory.mktemp("ssft") / "final"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "ssft.json").write_text(json.dumps({"fork_style": "special", "num_forks": 4}))
    return path


def gfpo_run(run, ssft_dir, out, sigterm_at=0, extra=()):
    flags = ["--model", str(ssft_dir), "--out_dir", str(out), "--toy_questions", "64", "--steps", "5",
             "--batch_size", "8", "--group_size", "8", "--lr", "1e-2", "--save_every", "0", *extra]
    return run([sys.executable, "-c", RUN, str(sigterm_at), str(ssft_dir), *flags])


def records(out):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def full_run(run, ssft_dir, tmp_path_factory):
    """An uninterrupted 5-step run of the stand-in: its directory."""
    out = tmp_path_factory.mktemp("gfpo") / "run"
    done = gfpo_run(run, ssft_dir, out)
    assert done.returncode == 0, done.stderr
    return out


def test_a_reduced_run_moves_the_tag_choice_toward_the_most_accurate_tag(run, full_run, tmp_path):
    steps = records(full_run)
    assert len(steps) == 5 and steps[0]["kl"] < 1e-4 and max(steps[0]["tag_choice"]) < 0.5
    first, last = steps[0]["tag_choice"], steps[-1]["tag_choice"]
    assert last[2] > first[2] + 0.2 and last[2] == max(last), (first, last)
    assert steps[-1]["kl"] > 0.05 and steps[-1]["entropy"] < steps[0]["entropy"]
    assert steps[-1]["reward"] > steps[0]["reward"]
    final = full_run / "final"
    assert json.loads((final / "ssft.json").read_text()) == {"fork_style": "special", "num_forks": 4}
    assert (full_run / "tag_choice.png").is_file()
    auto = run([sys.executable, "infer.py", "--model", str(final), "--data", "toy", "--fork", "auto", "--limit", "5",
                "--samples", "2", "--max_new_tokens", "4", "--output", str(tmp_path / "auto.jsonl")])
    assert auto.returncode == 0, auto.stderr
    rows = [json.loads(line) for line in open(tmp_path / "auto.jsonl")]
    for row in rows:  # greedy: every response takes the row's most likely tag, recorded per response
        best = max(row["fork_policy"], key=row["fork_policy"].get)
        assert [c["fork"] for c in row["completions"]] == [best] * 2
    assert "<think3>" in auto.stdout and "pass@1" in auto.stdout


def test_a_sigterm_checkpoints_and_the_resumed_run_is_identical(run, ssft_dir, full_run, tmp_path):
    stopped = gfpo_run(run, ssft_dir, tmp_path / "cut", sigterm_at=3)
    assert stopped.returncode == 128 + 15, stopped.stderr
    assert "checkpoints/step_000003" in stopped.stdout and len(records(tmp_path / "cut")) == 3
    rest = gfpo_run(run, ssft_dir, tmp_path / "cut")
    assert rest.returncode == 0 and "resumed from" in rest.stdout, rest.stderr
    assert records(tmp_path / "cut") == records(full_run)
    a, b = (load_file(d / "final" / "model.safetensors") for d in (full_run, tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_named_before_anything_is_written(ssft_dir, full_run, tmp_path, capsys):
    no_json = tmp_path / "plain"
    no_json.mkdir()
    with pytest.raises(SystemExit, match="no ssft.json"):
        gfpo.main(gfpo.parse_config(["--model", str(no_json), "--out_dir", str(tmp_path / "a")]))
    rows = tmp_path / "q.jsonl"
    rows.write_text('{"prompt": "Add 1+2+3."}\n')
    with pytest.raises(SystemExit, match=re.escape(f"{rows}:1")):
        gfpo.main(gfpo.parse_config(["--model", str(ssft_dir), "--data", str(rows), "--out_dir", str(tmp_path / "b")]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    before = sorted(os.listdir(full_run))
    with pytest.raises(SystemExit, match=re.escape("other settings (beta)")):  # a resume must not mix runs
        gfpo.main(gfpo.parse_config(["--model", str(ssft_dir), "--out_dir", str(full_run), "--toy_questions", "64",
                                     "--steps", "5", "--batch_size", "8", "--lr", "1e-2", "--beta", "0.5"]))
    assert sorted(os.listdir(full_run)) == before
    with pytest.raises(SystemExit):
        gfpo.parse_config(["--model", str(ssft_dir), "--group_size", "1"])
    assert "--group_size must be >= 2" in capsys.readouterr().err


def test_dapo_rows_give_the_user_message_and_the_ground_truth(tmp_path):
    path = tmp_path / "dapo.jsonl"
    path.write_text(json.dumps({"data_source": "math_dapo", "prompt": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve 2+2.\n\nAnswer: $Answer"}],
        "ability": "MATH", "reward_model": {"ground_truth": "4", "style": "rule-lighteval/MATH_v2"}}) + "\n")
    problem = evalfiles.load_problems(str(path))[0]
    assert problem["prompt"] == "Solve 2+2.\n\nAnswer: $Answer" and problem["gold"] == "4"
    path.write_text(json.dumps({"prompt": [{"role": "system", "content": "x"}], "reward_model": {}}) + "\n")
    with pytest.raises(data.DataError, match=re.escape(f"{path}:1") + ".*user message"):
        evalfiles.load_problems(str(path))


def test_show_prompts_for_fork_auto_lists_every_tag_it_chooses_among(run, ssft_dir):
    shown = run([sys.executable, "infer.py", "--model", str(ssft_dir), "--data", "toy", "--fork", "auto",
                 "--show_prompts"])
    assert shown.returncode == 0, shown.stderr
    assert "--fork auto" in shown.stdout and all(f"----- <think{i}>" in shown.stdout for i in range(1, 5))
