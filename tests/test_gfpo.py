"""Tests of GFPO (gfpo.py), its policy (policy.py) and infer.py --fork auto: CPU, seconds each.

    python -m pytest -q test_gfpo.py
"""
import copy
import json
import math
import os
import re
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import gfpo
import match
import policy
import toy
from plumbing import batching, decoding, evalfiles, fsdp, gfporun, memory


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
    """pi from the tags' rows (and, for text tags, their tokens after the digit) == the softmax over the
    tags of log p(g_i | x) summed from full forwards; the logged mass == sum_i p(g_i | x)."""
    tok, model, _ = tiny
    fork_ids = data.fork_ids(tok, 4, style)
    assert (len(fork_ids[0]) == 1) == (style == "special")
    prompts = [data.encode_prompt(tok, p) for p in ("Add 11+12+13.", "Add 28+19+11 and then some more words.")]
    got = policy.tag_logits(policy.TagPolicy(model, fork_ids, tok.pad_token_id), prompts)
    with torch.no_grad():
        expected = torch.stack([direct_tag_log_probs(model, p, fork_ids) for p in prompts])
    pi = policy.log_policy(got["tag_logits"]).exp()
    torch.testing.assert_close(pi, torch.softmax(expected, -1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["log_mass"], torch.logsumexp(expected, -1), atol=1e-4, rtol=1e-4)
    assert torch.allclose(pi.sum(-1), torch.ones(2)) and pi.std() > 0  # the tags differ


def test_no_output_row_but_the_tags_gets_a_gradient_in_bf16(tiny):
    """Fault 2: in bf16 the full-vocabulary cross-entropy's normaliser leaves small gradients on every
    output row, which Adam turns into steps of about lr. The tag logits are computed in fp32 from the
    tags' rows alone: a row that is neither a tag nor a prompt token (the toy ties its input rows to
    its output rows) gets exactly zero."""
    tok, model, fork_ids = tiny
    lm = copy.deepcopy(model).to(torch.bfloat16)
    tags = [[f] for f in fork_ids]
    prompts = [data.encode_prompt(tok, p) for p in ("Add 11+12+13.", "Add 2+5+2+8+8.")]
    others = torch.ones(lm.config.vocab_size, dtype=torch.bool)
    others[[t for p in prompts for t in p] + list(fork_ids)] = False
    logits = policy.TagPolicy(lm, tags, tok.pad_token_id)(prompts)["tag_logits"]
    assert logits.dtype == torch.float32
    (logits * torch.tensor([[1.0, -1, 0.5, 0]])).sum().backward()
    weight = lm.get_output_embeddings().weight
    assert weight.grad[others].abs().max() == 0 and weight.grad[fork_ids].abs().min() > 0
    lm.zero_grad()  # the computation it replaces: log p(g_i | x) through the full cross-entropy
    logp = -match.SequenceNLL(lm)(*[t for t in batching.collate(
        [data.make_sequence(p, [], t) for p in prompts for t in tags], tok.pad_token_id)])[0].view(2, 4)
    (policy.log_policy(logp) * torch.tensor([[1.0, -1, 0.5, 0]])).sum().backward()
    assert weight.grad[others].abs().max() > 0


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
    lm = copy.deepcopy(model)
    scorer = policy.TagPolicy(lm, fork_ids, tok.pad_token_id)
    seen = []
    lm.model.register_forward_pre_hook(lambda m, args, kw: seen.extend(
        r[r != tok.pad_token_id].tolist() for r in kw["input_ids"]), with_kwargs=True)
    if logpi_start is None:
        logpi_start = policy.log_policy(policy.tag_logits(scorer, prompts)["tag_logits"])
        seen.clear()
    tags = torch.tensor([[0, 1, 2, 2], [3, 3, 0, 1]])
    gfpo.policy_update(scorer, prompts, tags, advantages, logpi_start, beta, 1.0, 2, 1)
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


def test_the_update_runs_over_the_prompts_only_never_the_responses(tiny):
    """Special tags: the update's forward sees each prompt once (the tags are read off the output
    rows), so the responses never enter and the loss cannot change when they do."""
    tok, model, _ = tiny
    _, seen, prompts, fork_ids = update_inputs(model, tok, torch.tensor([[1., -1, 0, 0], [0.5, -0.5, 0, 0]]), 0.1)
    assert sorted(seen) == sorted(prompts)


def test_groups_whose_draws_are_one_tag_carry_no_gradient_and_are_counted(tiny):
    """Fault 3: when all G draws pick one tag, the advantages sum to zero on it and the policy
    gradient vanishes whatever the rewards: no_signal counts such groups beside equal-reward ones."""
    tags = torch.tensor([[2, 2, 2, 2], [0, 1, 0, 1], [1, 3, 1, 3], [0, 0, 0, 0]])
    rewards = torch.tensor([[1., 0, 0, 1], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert gfporun.no_signal(tags, rewards).tolist() == [True, True, False, True]
    logits = torch.randn(4, 4, requires_grad=True)
    advantages = gfpo.group_advantages(rewards)
    gfpo.gfpo_loss(logits, tags, advantages, torch.zeros(4, 4), 0.0, 1.0, 4).backward()
    assert (logits.grad.abs().sum(1) < 1e-6).tolist() == [True, True, False, True]
    one_hot = policy.log_policy(torch.eye(4).repeat(2, 1) * 30)  # each question its own tag
    assert gfporun.mutual_information(one_hot) == pytest.approx(math.log(4), abs=1e-4)
    assert gfporun.mutual_information(policy.log_policy(torch.randn(1, 4).repeat(8, 1))) == pytest.approx(0, abs=1e-6)


def test_a_step_never_takes_a_question_twice():
    """Fault 4: where a step crosses from one permutation into the next, a question already in its
    batch waits for the next step. Every question is still taken as often as the others (+-1)."""
    plan = gfporun.step_questions(5, 3, 20, seed=0)
    assert plan == gfporun.step_questions(5, 3, 20, seed=0)  # a pure function: resumes take the same steps
    assert all(len(set(batch)) == 3 for batch in plan)
    counts = Counter(q for batch in plan for q in batch)
    assert set(counts) == set(range(5)) and max(counts.values()) - min(counts.values()) <= 1


def test_a_truncated_response_gets_the_chosen_reward():
    """Fault 5: a response boxed mid-thought and cut at --max_new_tokens earned 1. grade: the grader's
    rule for cut responses (an answer only after a closed </think>); zero: 0 whatever it says."""
    gold = {"gold": "58", "kind": "math", "prompt": "Add 28+19+11."}
    mid_thought, closed = "Hmm, \\boxed{58} maybe, let me check 28+", "</think> The answer is \\boxed{58}.\nCheck: 2"
    assert gfpo.reward(mid_thought, True, gold, "grade") == 1.0  # finished: graded as it stands
    assert gfpo.reward(mid_thought, False, gold, "grade") == 0.0
    assert gfpo.reward(closed, False, gold, "grade") == 1.0 and gfpo.reward(closed, False, gold, "zero") == 0.0
    assert gfpo.reward("The answer is \\boxed{58}.", True, gold, "zero") == 1.0


def test_every_policy_forward_runs_in_eval_mode(tiny):
    """Fault 6: with dropout in the model, the update's forward (with grad) gives the very tag logits of
    the rollouts' (no grad), and two updates the same gradient: no forward runs in train mode."""
    tok, model, fork_ids = tiny
    lm = copy.deepcopy(model)
    lm.config.attention_dropout = 0.5
    for layer in lm.model.layers:
        layer.self_attn.attention_dropout = 0.5
    gfporun.eval_mode(lm, activation_checkpointing=True)
    scorer = policy.TagPolicy(lm, [[f] for f in fork_ids], tok.pad_token_id)
    prompts = [data.encode_prompt(tok, p) for p in ("Add 11+12+13.", "Add 2+5+2+8+8.")]
    rollout = policy.tag_logits(scorer, prompts)["tag_logits"]
    torch.testing.assert_close(scorer(prompts)["tag_logits"].detach(), rollout, rtol=0, atol=0)
    grads = []
    for _ in range(2):
        gfpo.policy_update(scorer, prompts, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1., -1], [1, -1]]),
                           torch.zeros(2, 4), 0.0, 1.0, 2, 2)
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters()]))
        lm.zero_grad()
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().max() > 0


def test_rollouts_on_the_fsdp_model_equal_those_of_the_plain_model(tiny, world_of_one):
    """gfpo.rollouts decodes with the sharded model's weights gathered (gfpodecoding.decoding_weights,
    every layer kept gathered or gathered per forward): the same tags, responses and rewards as on an
    unsharded copy."""
    tok, model, _ = tiny
    fork_ids = data.fork_ids(tok, 4, "special")
    qs = toy.make_questions(2, seed=3)
    prompts = [data.encode_prompt(tok, q["prompt"]) for q in qs]
    golds = [{"gold": q["answer"], "kind": "math", "prompt": q["prompt"]} for q in qs]
    cfg = gfpo.Config(group_size=4, max_new_tokens=6, micro_batch=1, temperature=0.7)
    outs = []
    for sharded, keep in ((False, False), (True, False), (True, True)):
        scorer = policy.TagPolicy(copy.deepcopy(model), fork_ids, tok.pad_token_id)
        scorer = fsdp.shard(scorer.lm, torch.device("cpu"), lambda lm: scorer) if sharded else scorer
        ctx = {"fork_ids": fork_ids, "stop_ids": {tok.eos_token_id}, "tokenizer": tok, "banned": [f[0] for f in fork_ids],
               "pad_id": tok.pad_token_id, "device": torch.device("cpu"), "rows": 3, "keep_gathered": keep}
        tag_generators = [torch.Generator().manual_seed(i) for i in range(2)]
        outs.append(gfpo.rollouts(scorer, prompts, golds, tag_generators, torch.Generator().manual_seed(5), cfg, ctx))
    for out in outs[1:]:
        for key in ("tags", "rewards", "tokens"):
            assert torch.equal(outs[0][key], out[key]), key
        torch.testing.assert_close(outs[0]["logpi"], out["logpi"])
    assert outs[0]["tokens"].sum() > 0


def test_the_rollout_memory_plan_keeps_the_layers_gathered_only_where_they_fit():
    """memory.gfpo_plan for Qwen2.5-32B, 32 responses per rank of 1024 + 16384 tokens: on 8 x 141 GiB
    every layer stays gathered (61 GiB of bf16 weights beside 46 GiB of sharded state); on 8 x 80 they
    do not fit beside the state, and do once it is offloaded."""
    shape = memory.read_shape({"hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
                               "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064})
    context = memory.PROMPT_TOKENS + 16384
    big, small = (memory.gfpo_plan(shape, 8, gib, 32, context) for gib in (141, 80))
    assert big["keep_gathered"] and big["ways"]["gathered"]["weights_gib"] == pytest.approx(61.0, abs=0.1)
    assert big["kv_gib_per_response"] == pytest.approx(context * 64 * 2 * 8 * 128 * 2 / 2 ** 30)
    assert not small["keep_gathered"] and small["ways"]["gathered"]["at_once"] == 0 and small["fits"]
    assert memory.gfpo_plan(shape, 8, 80, 32, context, cpu_offload=True)["keep_gathered"]
    assert big["ways"]["gathered"]["at_once"] < big["ways"]["sharded"]["at_once"] <= 32


# ----------------------------------------------------------------------------- whole runs

# A stand-in for decoding on a tiny random model, whose own answers are never right: under <think3>
# the answer is right 4 times in 5, under the other tags 1 in 5 (draws from the rank's generator).
RUN = r"""
import os, re, signal, sys, torch
import gfpo
from plumbing import decoding
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2])
best = tok.convert_tokens_to_ids("<think3>")
calls = []
def generate_many(model, prompts, starts, max_new_tokens, temperature, top_p, stop_ids, generator, max_rows=0,
                  banned=(), pad_id=0):
    out = []
    for prefix_ids, tags in zip(prompts, starts):
        total = sum(map(int, re.findall(r"\d+", tok.decode(prefix_ids).split("Add")[-1])))
        right = torch.rand(len(tags), generator=generator) < torch.tensor([0.8 if s == [best] else 0.2 for s in tags])
        out.append([(tok.encode(f"The answer is \\boxed{{{total if r else 0}}}."), True) for r in right.tolist()])
    return out
decoding.generate_many = generate_many
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
             "--batch_size", "8", "--group_size", "8", "--lr", "1e-2", "--save_every", "0", "--eval_every", "2",
             "--eval_questions", "20", *extra]
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
    assert json.loads((final / "ssft.json").read_text()) == {"fork_style": "special", "num_forks": 4,
                                                             "fork_temperature": 1.0}
    assert [s["step"] for s in steps if "held_out_pass@1" in s] == [1, 3, 4]  # every 2 steps and the last
    assert steps[-1]["held_out_pass@1"] > 0.6 and 0 < steps[0]["tag_mass"] < 1  # the own tag: <think3>
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


def test_tag_rows_trains_the_tags_output_rows_alone_so_responses_cannot_change(run, ssft_dir, tmp_path):
    """--trainable tag_rows: the tied toy gets its own output matrix; after the run every weight but
    the tags' output rows equals the start's (the input embeddings too), the choice has still moved to
    <think3>, and every response (greedy, no forking token sampled) is the one the start model gave."""
    out = tmp_path / "rows"
    done = gfpo_run(run, ssft_dir, out, extra=["--trainable", "tag_rows"])
    assert done.returncode == 0, done.stderr
    steps = records(out)
    assert steps[-1]["tag_choice"][2] == max(steps[-1]["tag_choice"]) > steps[0]["tag_choice"][2] + 0.2
    before, after = (load_file(d / "model.safetensors") for d in (ssft_dir, out / "final"))
    tok = AutoTokenizer.from_pretrained(ssft_dir)
    tags = tok.convert_tokens_to_ids(data.fork_tokens(4))
    assert "lm_head.weight" not in before  # tied at the start
    head = after["lm_head.weight"].float()
    start = before["model.embed_tokens.weight"].to(torch.bfloat16).float()
    others = torch.ones(len(head), dtype=torch.bool)
    others[tags] = False
    assert torch.equal(head[others], start[others]) and not torch.equal(head[tags], start[tags])
    assert all(torch.equal(after[k], before[k].to(torch.bfloat16)) for k in before)
    lms = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (ssft_dir, out / "final")]
    lms[0].to(torch.bfloat16).float()
    prompts = [data.encode_prompt(tok, q["prompt"]) for q in toy.make_questions(3, seed=1)]
    starts = [[[t] for t in tags]] * 3
    responses = [decoding.generate_many(lm, prompts, starts, 6, 0.0, 1.0, set(), torch.Generator(), banned=tags)
                 for lm in lms]
    assert responses[0] == responses[1]


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
                                     "--steps", "5", "--batch_size", "8", "--lr", "1e-2", "--eval_every", "2",
                                     "--eval_questions", "20", "--beta", "0.5"]))
    assert sorted(os.listdir(full_run)) == before
    with pytest.raises(SystemExit):
        gfpo.parse_config(["--model", str(ssft_dir), "--group_size", "1"])
    assert "--group_size must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gfpo.parse_config(["--model", str(tmp_path / "m.gguf")])
    assert "is a GGUF file: make a folder of it once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gfpo.parse_config(["--model", str(ssft_dir), "--eval_data", str(rows), "--eval_every", "0"])
    assert "--eval_data needs --eval_every >= 1" in capsys.readouterr().err


def test_the_toy_defaults_take_a_larger_step_when_only_the_tag_rows_train():
    """--trainable tag_rows cannot change a response, so its toy default lr is 1e-3, not 1e-5; a
    flag given still wins, and a run on other data keeps gfpo.py's own default."""
    assert gfpo.parse_config(["--trainable", "tag_rows"]).lr == 1e-3
    assert gfpo.parse_config([]).lr == gfpo.parse_config(["--trainable", "all"]).lr == 1e-5
    assert gfpo.parse_config(["--trainable", "tag_rows", "--lr", "1e-4"]).lr == 1e-4
    assert gfpo.parse_config(["--data", "q.jsonl", "--trainable", "tag_rows"]).lr == gfpo.Config.lr


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
