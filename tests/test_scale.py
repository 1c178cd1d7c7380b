"""Tests of what a 32B run on one 8-GPU node relies on, on the CPU: the memory plan (memory.py,
train.py --plan) against real modules, the concat row bound and its FlexAttention compile bound,
checkpoint retention, SIGTERM sent to torchrun, the export's memory bound, infer.py's refusal and
ranks balanced by tokens.

    python -m pytest -q test_scale.py
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import data
import infer
import match
import toy
import train
from plumbing import batching, concat, fsdp, memory

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
QWEN_32B = dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False,
                torch_dtype="bfloat16", model_type="qwen2", rms_norm_eps=1e-06, rope_theta=1000000.0,
                sliding_window=131072, use_sliding_window=False)
QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, model_type="qwen2")
SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=512, model_type="qwen2")


def model_dir(tmp_path, config):
    path = tmp_path / "model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def plan(capsys, *argv):
    """(exit code, printed table, the JSON of the last line) of train.py --plan, in-process."""
    with pytest.raises(SystemExit) as stop:
        train.main(train.parse_config(list(argv)))
    out = capsys.readouterr().out
    return stop.value.code, out, json.loads(out.strip().splitlines()[-1])


def test_plan_of_32b_from_config_json_alone_says_8x80_needs_offload_and_8x141_fits(tmp_path, capsys):
    model = model_dir(tmp_path, QWEN_32B)  # config.json only: no weights, no tokenizer to load
    code, table, verdict = plan(capsys, "--model", model, "--plan", "8x80")
    assert code == 3 and verdict["fits"] is False and "--cpu_offload true" in table
    assert abs(verdict["peak_gib_per_gpu"] - 108.9) / 108.9 < 0.15  # an independent hand count of the same terms: about 108.9 GiB
    code, _, offloaded = plan(capsys, "--model", model, "--plan", "8x80", "--cpu_offload", "true")
    assert code == 0 and offloaded["fits"] and abs(offloaded["peak_gib_per_gpu"] - 47) / 47 < 0.15
    assert offloaded["host_gib_per_rank"] > verdict["host_gib_per_rank"] - 20  # the sharded state moved there
    code, _, h200 = plan(capsys, "--model", model, "--plan", "8x141")
    assert code == 0 and h200["fits"]


def test_plan_rejects_a_malformed_gpu_spec_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_config(["--plan", "eight"])
    assert "--plan must be GPUSxGiB" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_a_real_qwen2(tied):
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=tied))
    assert memory.num_params(memory.read_shape({**SMALL, "tie_word_embeddings": tied})) == \
        sum(p.numel() for p in lm.parameters())


def saved_activation_bytes(lm, run):
    """Bytes of the distinct tensors autograd saves during run(), parameters left out."""
    params, seen = {p.untyped_storage().data_ptr() for p in lm.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def test_saved_activation_bytes_of_one_layer_match_the_plan():
    """What a CPU measurement can check: the bytes autograd saves (bf16 compute), not the allocator's peak."""
    torch.manual_seed(0)
    shape, tokens = memory.read_shape(SMALL), 512
    lm = Qwen2ForCausalLM(Qwen2Config(**SMALL, attn_implementation="sdpa")).to(torch.bfloat16)
    ids, pos = torch.randint(0, 512, (1, tokens)), torch.arange(tokens)[None]
    h = lm.model.embed_tokens(ids).detach().requires_grad_()
    layer = saved_activation_bytes(lm, lambda: lm.model.layers[0](
        h, position_embeddings=lm.model.rotary_emb(h, pos), position_ids=pos, attention_mask=None))
    assert abs(layer - memory.layer_activation_bytes(shape, tokens)) / layer < 0.1, layer


def test_layer_checkpoints_cost_one_bf16_hidden_state_per_layer():
    torch.manual_seed(0)
    tokens, saved = 512, []
    for layers in (1, 3):
        lm = Qwen2ForCausalLM(Qwen2Config(**{**SMALL, "num_hidden_layers": layers}, attn_implementation="sdpa"))
        lm = lm.to(torch.bfloat16).train()
        fsdp.checkpoint_layers(lm)
        ids = torch.randint(0, 512, (1, tokens))
        saved.append(saved_activation_bytes(lm, lambda: lm.model(input_ids=ids).last_hidden_state))
    assert saved[1] - saved[0] == 2 * 2 * tokens * SMALL["hidden_size"]  # plan: 2nTH bytes


def test_concat_rows_fit_max_len_as_a_whole_cutting_the_long_traces_evenly():
    tok = toy.make_tokenizer()
    q = {"prompt": "Add 12+23+14.", "traces": ["7 " * 200, "ok", "3 " * 90, "5 " * 300]}
    batch = data.encode_question(tok, q, 256)
    enc = data.encode_question(tok, q, 256, layout="concat")
    row = concat.make_branches(enc["prompt_ids"], [([7], t) for t in enc["trace_ids"]])
    assert len(row[0]) <= 256 and len(row[0]) >= 256 - len(q["traces"])  # the room is used, not wasted
    lengths = [len(t) for t in enc["trace_ids"]]
    assert enc["trace_ids"][1] == batch["trace_ids"][1]  # a short trace is never cut
    assert max(lengths[0], lengths[2], lengths[3]) - min(lengths[0], lengths[3]) <= 1  # the long ones alike
    assert enc["truncated"] == 3 and all(t == b[:len(t)] for t, b in zip(enc["trace_ids"], batch["trace_ids"]))
    with pytest.raises(data.DataError, match="no room for 4 traces in one --layout concat row"):
        data.encode_question(tok, q, len(enc["prompt_ids"]) + 6, layout="concat")


def test_flex_attention_compiles_one_graph_per_bucket_not_per_row_length():
    """A dozen concat rows of different lengths, FlexAttention's forward on the CPU, Dynamo made to guard
    on every length (as torch 2.11 does on the BlockMask's): compiles are bounded by the buckets."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from match import SequenceNLL
    torch.manual_seed(0)
    cfg = toy.make_model(toy.make_tokenizer(), hidden=32).config
    cfg._attn_implementation = "flex_attention"
    flex = Qwen2ForCausalLM(cfg).eval()
    lengths = range(130, 190, 5)  # 12 lengths, two buckets (160, 192)
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False), torch.no_grad():
        for n in lengths:
            rows = [concat.make_branches(list(range(1, 21)), [([7], list(range(20, n - 3))), ([8], [30])])]
            assert len(rows[0][0]) == n
            ids, labels, pos, branches = concat.collate_branches(rows, 0, bucket=True)
            assert ids.shape[1] == concat.bucket_length(n)
            SequenceNLL(flex)(ids, labels, concat.tree_block_mask(branches), pos)
    buckets = {concat.bucket_length(n) for n in lengths}
    assert len(buckets) == 2 and 0 < counters["stats"]["unique_graphs"] <= len(buckets) < len(lengths)
    assert concat.num_buckets(32768) <= 40  # a whole 32k run stays under train.py's raised recompile limit


def test_bucket_lengths_pad_at_most_a_quarter():
    for n in range(1, 5000):
        b = concat.bucket_length(n)
        assert b >= n and (b <= 128 or b <= 1.25 * n)


def test_ranks_get_similar_tokens_when_one_question_holds_the_long_traces():
    loads = [9000, 1000, 1200, 900, 1100, 1000, 800, 1000]  # tokens of a step's rows
    ranks = batching.balance(loads, 2)
    assert sorted(i for r in ranks for i in r) == list(range(8))
    totals = [sum(loads[i] for i in r) for r in ranks]
    assert max(totals) == 9000  # the long row alone; by count (4 + 4) one rank would hold 9000 + 3 others


def tiny_fsdp_model():
    tok = toy.make_tokenizer()
    lm = toy.make_model(tok)
    return fsdp.shard(lm, torch.device("cpu"), match.SequenceNLL), tok, lm.config


def test_only_the_newest_complete_checkpoints_are_kept_and_only_after_a_new_one_completes(
        tmp_path, world_of_one, monkeypatch):
    model, _, _ = tiny_fsdp_model()
    opt = torch.optim.AdamW(model.parameters())
    for step in (1, 2, 3):
        fsdp.save_checkpoint(model, opt, step, {}, str(tmp_path), 0, keep=2)
    assert [s for s, _ in fsdp.checkpoints(str(tmp_path))] == [2, 3]
    (tmp_path / "checkpoints" / "step_000009.corrupt").mkdir()

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(fsdp.dcp, "save", fail)  # a save that dies half-way deletes nothing
    with pytest.raises(OSError):
        fsdp.save_checkpoint(model, opt, 4, {}, str(tmp_path), 0, keep=2)
    assert [s for s, _ in fsdp.checkpoints(str(tmp_path))] == [2, 3]
    monkeypatch.undo()
    fsdp.save_checkpoint(model, opt, 5, {}, str(tmp_path), 0, keep=1)
    assert [s for s, _ in fsdp.checkpoints(str(tmp_path))] == [5]
    assert (tmp_path / "checkpoints" / "step_000009.corrupt").is_dir()  # set aside, never deleted here
    fsdp.save_checkpoint(model, opt, 6, {}, str(tmp_path), 0, keep=0)
    assert [s for s, _ in fsdp.checkpoints(str(tmp_path))] == [5, 6]


def test_sigterm_to_the_torchrun_launcher_leaves_a_checkpoint_the_same_command_resumes(tmp_path):
    out = tmp_path / "run"
    flags = ["--toy_questions", "64", "--out_dir", str(out), "--save_every", "0"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    proc = subprocess.Popen(launch + flags, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().count("\n"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as a scheduler sends it
    stdout, stderr = proc.communicate(timeout=120)
    saved = fsdp.checkpoints(str(out))
    assert proc.returncode != 0 and saved, stdout[-2000:] + stderr[-2000:]
    step = saved[-1][0]
    assert 1 <= step < 16 and "the same command resumes" in stdout
    rest = subprocess.run(launch + flags + ["--max_steps", str(step + 1)], cwd=HERE, capture_output=True, text=True,
                          timeout=180)
    assert rest.returncode == 0 and f"at step {step}" in rest.stdout, rest.stderr[-3000:]


EXPORT_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config
import toy
from plumbing import fsdp, ranks
ranks.init_distributed()
with torch.device("meta"):
    lm = AutoModelForCausalLM.from_config(Qwen2Config(**json.loads(sys.argv[1])), dtype=torch.float32)
model = fsdp.shard(lm, torch.device("cpu"))
model.to_empty(device="cpu")
with torch.no_grad():
    for p in model.parameters():
        p.fill_(0.01)  # touched, so that the weights count in the resident memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
hwm = lambda: 1024 * int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
before = rss()
with open("/proc/self/clear_refs", "w") as f:  # the peak from here on: the export's, not the loading's
    f.write("5")
fsdp.save_final(model, toy.make_tokenizer(), lm.config, sys.argv[2], 0, {}, shard_gib=float(sys.argv[3]))
print(json.dumps({"before": before, "peak": hwm(),
                  "params": sum(p.numel() for p in model.parameters()),
                  "largest": max(p.numel() for p in model.parameters())}))
"""


def test_the_export_of_a_0_5b_shape_holds_one_file_of_tensors_not_a_second_copy(tmp_path):
    """Random-init Qwen2.5-0.5B shapes (2 GB of fp32 weights): the export's extra peak resident memory
    stays under a third of the bf16 model (one file and one tensor), and from_pretrained reads what it wrote."""
    final = tmp_path / "final"
    run = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, json.dumps(QWEN_05B), str(final), "0.25"], cwd=HERE,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    extra, bf16_model = m["peak"] - m["before"], 2 * m["params"]
    print(f"export extra peak {extra / 2**20:.0f} MiB, bf16 model {bf16_model / 2**20:.0f} MiB")
    assert extra < bf16_model / 3 and extra < 0.25 * 2**30 + 2 * m["largest"] + 100 * 2**20, extra
    index = json.loads((final / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == bf16_model and "lm_head.weight" not in index["weight_map"]
    from safetensors import safe_open
    shapes = {}
    for name in set(index["weight_map"].values()):
        with safe_open(final / name, "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    with torch.device("meta"):
        expected = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B)).state_dict()
    assert shapes == {k: list(v.shape) for k, v in expected.items() if k != "lm_head.weight"}
    assert json.loads((final / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_infer_refuses_a_model_that_cannot_fit_before_loading_naming_vllm(tmp_path, world_of_one):
    model = model_dir(tmp_path, QWEN_32B)  # a tokenizer and a config, no weights: a load would fail otherwise
    toy.make_tokenizer().save_pretrained(model)
    with pytest.raises(SystemExit, match="serve it with vLLM") as stop:
        infer.main(infer.parse_config(["--model", model, "--data", "toy", "--limit", "1", "--fork", "none",
                                       "--output", str(tmp_path / "rows.jsonl")]))
    assert "GiB of KV cache (32 streams x 33792 tokens)" in str(stop.value)
    assert not (tmp_path / "rows.jsonl").exists()
