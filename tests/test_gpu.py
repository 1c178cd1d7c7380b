"""The CUDA code paths, each once: FlexAttention's tree mask (--layout concat), the bf16 FSDP2 step
against fp32, NCCL, --cpu_offload, infer.py's decoding on the GPU against the CPU, and GFPO's rollouts
and update in bf16 and a gfpo.py run under torchrun. Skipped on a machine without CUDA; gpu_check.sh
runs them on one GPU before bench.py.

    python -m pytest -q -rs test_gpu.py
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import gfpo
import infer
import match
import policy
import toy
import train
from plumbing import concat, decoding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


def test_flex_attention_block_mask_equals_the_dense_mask_forward_and_backward(sdpa_and_flex_models):
    sdpa, flex = sdpa_and_flex_models(64, "cuda")
    rows = [concat.make_branches(list(range(1, 40)), [([7], list(range(20, 200))), ([8], list(range(50, 130)))])]
    input_ids, labels, position_ids, branch_ids = (t.cuda() for t in concat.collate_branches(rows, pad_id=0))
    out = []
    for model, mask in ((sdpa, concat.tree_mask(branch_ids)), (flex, concat.tree_block_mask(branch_ids))):
        total, _ = match.SequenceNLL(model)(input_ids, labels, mask, position_ids)
        total.sum().backward()
        out.append((total, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-4, atol=1e-4)
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], grad, rtol=1e-3, atol=1e-4)


def one_step(device):
    """Cost matrix, loss and gradients of a train.py step of the toy on a device: bf16 compute with
    fp32 reduction on CUDA (fsdp.shard), fp32 on the CPU. The pairs are fixed (sft), so that both
    devices train the same sequences whatever ties bf16 breaks in the matching."""
    cfg = train.parse_config(["--toy_questions", "8", "--layout", "batch", "--micro_batch", "8"])
    tok, fork_ids, num_trained = train.load_tokenizer(cfg)
    model, _ = train.load_model(cfg, tok, fork_ids, num_trained, 0, device)
    encoded = [data.encode_question(tok, q, cfg.max_len) for q in toy.make_questions(8, seed=0)]
    cost = match.cost_matrix(model, encoded[0]["prompt_ids"], fork_ids, encoded[0]["trace_ids"], cfg.match_tokens,
                             16, tok.pad_token_id, device)
    matched = match.match_questions(model, encoded, fork_ids, "sft", cfg.match_tokens, cfg.match_batch,
                                    tok.pad_token_id, device, [None] * 8)
    rows = train.training_rows(encoded, matched, fork_ids, "batch")
    loss, *_ = train.training_pass(model, rows, cfg.micro_batch, "batch", tok.pad_token_id, device)
    grads = torch.cat([p.grad.full_tensor().float().flatten().cpu() for p in model.parameters()])
    return cost, loss, grads


def test_bf16_step_on_cuda_matches_the_fp32_step_on_the_cpu(world_of_one):
    """Tolerance: costs and loss within 2% and 1% relative, the gradient's direction within cosine 0.99."""
    cost_gpu, loss_gpu, grads_gpu = one_step(torch.device("cuda"))
    cost_cpu, loss_cpu, grads_cpu = one_step(torch.device("cpu"))
    torch.testing.assert_close(cost_gpu, cost_cpu, rtol=2e-2, atol=2e-2)
    assert math.isclose(loss_gpu, loss_cpu, rel_tol=1e-2), (loss_gpu, loss_cpu)
    assert torch.nn.functional.cosine_similarity(grads_gpu, grads_cpu, dim=0) > 0.99


def test_decoding_on_cuda_equals_the_cpu_under_greedy(tiny):
    tokenizer, model, fork_ids = tiny
    prefix = data.encode_prompt(tokenizer, "Add 12+23+14.")
    starts = [[f] for f in fork_ids]
    cpu = decoding.generate(model, prefix, starts, 8, 0.0, 1.0, set(), torch.Generator())
    try:
        gpu = decoding.generate(model.to("cuda"), prefix, starts, 8, 0.0, 1.0, set(), torch.Generator("cuda"))
    finally:
        model.to("cpu")  # the fixture is shared with the CPU tests
    assert gpu == cpu


@pytest.mark.parametrize("flags", [[], ["--layout", "concat"], ["--cpu_offload", "true"]],
                         ids=["batch", "concat-flex", "cpu-offload"])
def test_train_py_runs_on_one_gpu_with_nccl(tmp_path, flags):
    """torchrun: the NCCL process group, FSDP2 in bf16, final/ written; then infer.py decodes it in bf16."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "train.py", "--toy_questions", "64", "--max_steps", "3", "--out_dir", str(out), *flags],
                          cwd=HERE, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on cuda" in done.stdout and all(math.isfinite(json.loads(line)["loss"])
                                            for line in open(out / "metrics.jsonl"))
    metrics = infer.main(infer.parse_config(["--model", str(out / "final"), "--data", "toy", "--limit", "2",
                                             "--samples", "4", "--max_new_tokens", "16",
                                             "--output", str(tmp_path / "rows.jsonl")]))
    assert metrics["responses"] == 8


# The memory simulation (plumbing/simulate.py) against the allocator: one real step of train.py on this GPU
GPU_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False, model_type="qwen2",
                 max_position_embeddings=32768)
REAL_STEP = """
import json, sys, torch, torch.distributed as dist
import match, train
from plumbing import fsdp, memory, simulate
model_dir, device, flags = sys.argv[1], torch.device(sys.argv[2]), json.loads(sys.argv[3])
backend = "nccl" if device.type == "cuda" else "gloo"
dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
cfg = train.parse_config(["--model", model_dir] + flags)
torch.manual_seed(0)
layers = memory.read_shape(model_dir)["layers"]
lm = simulate.meta_model(memory.read_config(model_dir)[0], layers, device="cpu")
model = fsdp.shard(lm, device, match.SequenceNLL, cfg.activation_checkpointing, cfg.cpu_offload)
optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                              fused=True)
for p in model.parameters():  # AdamW's state as after a first step, as the simulation makes it
    p.grad = torch.zeros_like(p)
optimizer.step()
optimizer.zero_grad(set_to_none=True)
_, step = train.simulated_step(cfg, device=device)
if device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
step(model, optimizer, lambda name: None)
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
print(json.dumps({"peak_gib": peak / 2 ** 30}))
dist.destroy_process_group()
"""
SIMULATED_STEP = """
import json, sys
import train
from plumbing import memory, simulate
model_dir, flags = sys.argv[1], json.loads(sys.argv[2])
cfg = train.parse_config(["--model", model_dir] + flags)
layers = memory.read_shape(model_dir)["layers"]
sim = simulate.simulate(*train.simulated_step(cfg), layers, 1, cfg.cpu_offload)
print(json.dumps({"peak_gib": max(sim["phases"].values()), "phases": simulate.phase_peaks(sim)}))
"""


@pytest.mark.parametrize("flags", [[], ["--cpu_offload", "true"]], ids=["state-on-gpu", "cpu-offload"])
def test_simulated_peak_is_within_10_percent_of_cuda_max_memory_allocated_of_one_real_step(tmp_path, flags):
    """train.py's step (simulated_step: matching pass, training pass, clipping, fused AdamW) on one GPU, its
    torch.cuda.max_memory_allocated after AdamW's state exists, against plumbing/simulate.py's peak of the
    same step on fake tensors. What the simulation leaves out (cuBLAS workspaces, rounding to 512-byte
    blocks) is well under 10% at this shape (a peak of a few GiB); NCCL's buffers are not in the allocator."""
    (tmp_path / "config.json").write_text(json.dumps(GPU_SHAPE))
    flags = ["--max_len", "16384", *flags]
    real, simulated = (subprocess.run([sys.executable, "-c", script, str(tmp_path), *extra, json.dumps(flags)],
                                      cwd=HERE, capture_output=True, text=True, timeout=600)
                       for script, extra in ((REAL_STEP, ["cuda"]), (SIMULATED_STEP, [])))  # fresh processes
    assert real.returncode == 0, real.stderr[-3000:]
    assert simulated.returncode == 0, simulated.stderr[-3000:]
    cuda, sim = (json.loads(run.stdout.strip().splitlines()[-1]) for run in (real, simulated))
    print(f"{flags}: CUDA max_memory_allocated {cuda['peak_gib']:.3f} GiB, "
          f"simulated {sim['peak_gib']:.3f} GiB ({sim['phases']})")
    assert abs(sim["peak_gib"] - cuda["peak_gib"]) <= 0.1 * cuda["peak_gib"], (cuda, sim)


def test_gfpo_rollouts_and_update_run_on_cuda_in_bf16(tiny):
    """GFPO's rollouts at T = 0.7 on the GPU: the responses' generator lives on the device (a CPU
    generator, as gfpo.py once built, raises "Expected a 'cuda' device type for generator" at the first
    sampled token); the update in bf16 reaches no output row but the tags' and the prompts'."""
    tok, model, fork_ids = tiny
    lm = copy.deepcopy(model).to("cuda", torch.bfloat16)
    scorer = policy.TagPolicy(lm, [[f] for f in fork_ids], tok.pad_token_id)
    qs = toy.make_questions(3, seed=2)
    prompts = [data.encode_prompt(tok, q["prompt"]) for q in qs]
    golds = [{"gold": q["answer"], "kind": "math", "prompt": q["prompt"]} for q in qs]
    cfg = gfpo.Config(group_size=4, max_new_tokens=8, micro_batch=2, temperature=0.7)
    ctx = {"fork_ids": [[f] for f in fork_ids], "stop_ids": {tok.eos_token_id}, "tokenizer": tok,
           "banned": list(fork_ids), "pad_id": tok.pad_token_id, "device": torch.device("cuda"), "rows": 5,
           "keep_gathered": True}
    tag_generators = [torch.Generator().manual_seed(i) for i in range(3)]
    out = gfpo.rollouts(scorer, prompts, golds, tag_generators, torch.Generator("cuda").manual_seed(0), cfg, ctx)
    assert out["tags"].shape == out["rewards"].shape == out["tokens"].shape == (3, 4) and out["tokens"].sum() > 0
    with pytest.raises(RuntimeError, match="generator"):
        gfpo.rollouts(scorer, prompts, golds, tag_generators, torch.Generator(), cfg, ctx)
    gfpo.policy_update(scorer, prompts, out["tags"], torch.randn(3, 4), out["logpi"], 0.1, 1.0, 3, 2)
    others = torch.ones(lm.config.vocab_size, dtype=torch.bool)
    others[[t for p in prompts for t in p] + list(fork_ids)] = False
    grad = lm.get_output_embeddings().weight.grad
    assert grad[others.cuda()].abs().max() == 0 and grad[list(fork_ids)].abs().max() > 0


def test_gfpo_py_runs_on_one_gpu_with_nccl(tmp_path):
    """torchrun gfpo.py on a tiny SSFT-like model: FSDP2 in bf16, the rollout memory plan on the device,
    responses decoded with every layer kept gathered, the held-out Pass@1, final/ written."""
    torch.manual_seed(0)
    tok = toy.make_tokenizer()
    lm = toy.make_model(tok, hidden=32)
    num_trained = len(tok)
    data.init_fork_rows(lm, data.add_fork_tokens(tok, 4), num_trained, seed=0)
    ssft = tmp_path / "ssft"
    lm.save_pretrained(ssft)
    tok.save_pretrained(ssft)
    (ssft / "ssft.json").write_text(json.dumps({"fork_style": "special", "num_forks": 4}))
    out = tmp_path / "gfpo"
    for trainable in ("all", "tag_rows"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "1", "gfpo.py", "--model", str(ssft), "--out_dir", str(out / trainable), "--steps", "2",
                               "--batch_size", "4", "--toy_questions", "16", "--max_new_tokens", "8",
                               "--eval_every", "1", "--eval_questions", "4", "--trainable", trainable],
                              cwd=HERE, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "on cuda" in done.stdout and "GFPO rollout plan" in done.stdout and "layers kept gathered" in done.stdout
        steps = [json.loads(line) for line in open(out / trainable / "metrics.jsonl")]
        assert len(steps) == 2 and all(math.isfinite(s["loss"]) and "held_out_pass@1" in s for s in steps)
        assert (out / trainable / "final" / "ssft.json").exists()
