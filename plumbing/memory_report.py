"""The memory plan as the scripts report it: `--plan GPUSxGiB` (the table, the JSON line, exit 0 if it
fits, 3 if not; with `--simulate`, the peaks measured on fake tensors beside it), the refusal on CUDA
before the weights load, infer.py's check of weights and KV cache, and gfpo.py's rollout plan. The arithmetic is memory.py's,
the measurement simulate.py's.
"""
import json
import os
import sys

import numpy as np
import torch

from plumbing import memory, simulate


PLAN_HINT = ("to fit: --cpu_offload true (sharded state to host memory), a smaller --max_len or --micro_batch, "
             "--activation_checkpointing true, or more GPUs (docs/scaling.md)")


def plan_problem(text):
    """The --plan problem for flags.check, or None ('' means no plan asked)."""
    try:
        text and memory.parse_gpus(text)
    except ValueError as e:
        return str(e)
    return None


def plan_exit(make_plan, gpus, gib, settings, simulated_step=None):
    """--plan GPUSxGiB: prints the memory table of make_plan() (memory.train_plan's record) and one JSON
    line (with `settings`, the flags that shape it), then exits 0 if it fits, 3 if not. make_plan reads
    only config.json. simulated_step: with --simulate, the stage's (build, step) for simulate.simulate,
    whose measured peaks are printed beside the plan's and added to the JSON line."""
    try:
        plan = make_plan()
    except ValueError as e:
        sys.exit(f"error: {e}")
    lines, fits = memory.format_plan(plan, gpus, gib)
    print("\n".join(lines + ([] if fits else [f"  {PLAN_HINT}"])), flush=True)
    measured = {}
    if simulated_step and simulate.missing():
        print(f"--simulate: skipped, {simulate.missing()}")
    elif simulated_step:  # the same phases measured on the stage's own step, on fake tensors
        sim = simulate.simulate(*simulated_step(), plan["layers"], gpus, plan["offload"])
        print("\n".join(format_comparison(plan, sim, gpus)))
        measured = {"simulated_peak_gib": round(max(sim["phases"].values()), 2),
                    "simulated_s": round(sim["seconds"]), "simulated_host_gib": round(sim["host_gib"], 2)}
    print(json.dumps({"peak_gib_per_gpu": round(plan["peak_gib_per_gpu"], 1),
                      "host_gib_per_rank": round(plan["host_gib_per_rank"], 1), "fits": fits, "gpus": gpus,
                      "gib_per_gpu": gib, **settings, **measured}))
    sys.exit(0 if fits else 3)


def train_plan_exit(cfg, memory_plan, simulated_step):
    """train.py --plan GPUSxGiB: plan_exit of memory_plan(cfg, gpus) (train.memory_plan), measured by
    simulated_step(cfg) (train.simulated_step) with --simulate. Exits 0 if it fits, 3 if not."""
    gpus, gib = memory.parse_gpus(cfg.plan)
    settings = {k: getattr(cfg, k) for k in ("layout", "max_len", "micro_batch", "cpu_offload")}
    plan_exit(lambda: memory_plan(cfg, gpus), gpus, gib, settings,
              (lambda: simulated_step(cfg)) if cfg.simulate else None)


def train_plan(cfg, config, gpus, traces=4):
    """memory.train_plan of train.py's flags `cfg` on `gpus` GPUs from the model's config.json alone
    (`config`: memory.read_config's argument), with fused AdamW (train.py's optimiser on CUDA).
    traces: M, the most traces of a question. Raises ValueError naming a bad config."""
    return memory.train_plan(memory.read_shape(config), gpus, cfg.layout, cfg.max_len, cfg.micro_batch,
                             cfg.match_batch, cfg.match_tokens, cfg.num_forks, traces,
                             cfg.activation_checkpointing, cfg.cpu_offload, fused_adamw=True)


def simulated_train_step(cfg, config, device, traces, wrap, match_questions, training_rows, training_pass):
    """(build, step) of train.py's optimiser step for simulate.simulate (--plan --simulate): the model of
    `config` cut to a few layers and wrap()ped (match.SequenceNLL), and one step on questions of the plan's
    worst case (simulate.worst_case): the matching pass (match_questions), the training pass
    (training_rows, training_pass: train.py's own), clipping and fused AdamW."""
    build = simulate.builder(memory.read_config(config)[0], device, wrap, cfg.activation_checkpointing,
                             cfg.cpu_offload, cfg.lr, cfg.weight_decay)
    encoded, fork_ids = simulate.worst_case(cfg.max_len, cfg.layout, traces, cfg.num_forks, cfg.matching,
                                            cfg.micro_batch)

    def step(model, optimizer, phase):
        phase("matching pass")
        rngs = [np.random.default_rng([cfg.seed, q]) for q in range(len(encoded))]
        matched = match_questions(model, encoded, fork_ids, cfg.matching, cfg.match_tokens, cfg.match_batch,
                                  0, device, rngs, None, cfg.layout)
        phase("training pass")
        training_pass(model, training_rows(encoded, matched, fork_ids, cfg.layout), cfg.micro_batch,
                      cfg.layout, 0, device)
        phase("optimizer step")
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return build, step


def refuse_unless_fits(plan, world, device):
    """On CUDA, before the weights load: prints the plan for the GPUs we are on and exits naming what to
    change when it does not fit."""
    import torch
    gib = torch.cuda.get_device_properties(device).total_memory / memory.GIB
    lines, fits = memory.format_plan(plan, world, gib)
    if int(os.environ.get("RANK", 0)) == 0:
        print("\n".join(lines), flush=True)
    if not fits:
        sys.exit(f"error: these flags do not fit {world} x {gib:.0f} GiB; {PLAN_HINT}")


def refuse_unless_infer_fits(model, streams, max_new_tokens, device):
    """infer.py, before loading: SystemExit when a whole model per rank (read on its CPU first) and the
    KV cache of `streams` responses of a PROMPT_TOKENS prompt + max_new_tokens cannot fit a rank
    (infer_plan: 256 GiB of cache for 32B at 32 x 32k), naming what to lower or vLLM. A model without
    a plain config.json is left to from_pretrained to judge."""
    import torch
    try:
        shape = memory.read_shape(model)
    except ValueError:
        return
    context = memory.PROMPT_TOKENS + max_new_tokens
    weights, kv = memory.infer_plan(shape, streams, context, 2 if device.type == "cuda" else 4)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / memory.GIB / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    have = torch.cuda.get_device_properties(device).total_memory / memory.GIB if device.type == "cuda" else host
    if weights + kv > have or weights > host:
        raise SystemExit(f"error: --model {model}: {weights:.0f} GiB of weights + {kv:.0f} GiB of KV cache "
                         f"({streams} streams x {context} tokens) do not fit {have:.0f} GiB on {device.type} per rank "
                         f"(host {host:.0f} GiB): infer.py keeps a whole model per rank; lower --batch_size or "
                         "--max_new_tokens, or serve it with vLLM (docs/vllm.md)")


def format_comparison(plan, sim, world):
    """Lines of the table --plan --simulate prints: each phase's peak as planned (its tensors, without
    the plan's CUDA context) and as simulated, their ratio, and what the simulation left out."""
    measured = simulate.phase_peaks(sim)
    probes = " and ".join(map(str, sim["probes"]))
    out = [f"simulated on fake tensors (plumbing/simulate.py), rank 0 of {world}: {probes} layers measured"
           + ("" if len(sim["probes"]) == 1 else ", a straight line to the model's")
           + f"; {sim['seconds']:.0f} s, {sim['host_gib']:.1f} GiB of host memory",
           f"  {'phase':<20s} {'plan (tensors)':>15s} {'simulated':>10s} {'plan/sim':>9s}"]
    rows = [(name, x - plan["context_gib"], measured.get(name)) for name, x, _ in plan["phases"]]
    rows.append(("peak", max(r[1] for r in rows), max(measured.values())))
    for name, planned, simulated in rows:
        simulated = float("nan") if simulated is None else simulated
        ratio = f"{planned / simulated:9.3f}" if simulated >= 0.01 else f"{'-':>9s}"  # not a ratio of ~0s
        out.append(f"  {name:<20s} {planned:15.2f} {simulated:10.2f} {ratio}")
    key = max(sim["phases"], key=sim["phases"].get)
    at = sorted(sim["categories"][key].items(), key=lambda cg: -cg[1])
    host = [(c, g) for c, g in at if plan["offload"] and c in simulate.HOST]
    out.append(f"  at the simulated peak ({key[0]}, {key[1]}), GiB: " + ", ".join(
        f"{c} {g:.2f}" for c, g in at if (c, g) not in host) + (", in host memory: " + ", ".join(
            f"{c} {g:.2f}" for c, g in host) if host else ""))
    out.append(f"  not simulated: the plan's {plan['context_gib']:g} GiB of CUDA context, NCCL and slack, "
               "the allocator's fragmentation, kernels' workspaces")
    return out


def rollout_plan(cfg, config, gpus, gib, context):
    """memory.gfpo_plan of gfpo.py's flags `cfg`: the model of `config` (memory.read_shape's
    argument) on `gpus` GPUs of `gib` GiB, a rank's batch_size / gpus x group_size responses of
    `context` tokens each. Raises ValueError naming a bad config."""
    return memory.gfpo_plan(memory.read_shape(config), gpus, gib, cfg.batch_size // gpus * cfg.group_size,
                            context, cfg.cpu_offload)


def gfpo_plan_exit(cfg):
    """gfpo.py --plan GPUSxGiB: prints the rollout plan of --model's config.json (prompts of
    memory.PROMPT_TOKENS); exits 0 if it fits, 3 if not."""
    gpus, gib = memory.parse_gpus(cfg.plan)
    try:
        plan = rollout_plan(cfg, cfg.model, gpus, gib, memory.PROMPT_TOKENS + cfg.max_new_tokens)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print("\n".join(format_gfpo_plan(plan, gpus, gib)))
    sys.exit(0 if plan["fits"] else 3)


def format_gfpo_plan(plan, gpus, gib):
    """The lines gfpo.py --plan prints: both ways and the one gfpo.py takes."""
    out = [f"GFPO rollout plan per GPU ({gpus} GPUs of {gib:g} GiB, {plan['params'] / 1e9:.2f}B parameters, "
           f"{plan['rows']} responses per rank of up to {plan['context']} tokens):",
           f"  {'sharded state (fp32 weights, AdamW moments)':<52s} {plan['state_gib']:7.1f} GiB",
           f"  {'KV cache of one response':<52s} {plan['kv_gib_per_response']:7.1f} GiB"]
    for way, what in (("sharded", "layers gathered by each forward"),
                      ("gathered", "every layer kept gathered")):
        w = plan["ways"][way]
        out.append(f"  {what:<33s} weights {w['weights_gib']:5.1f} GiB, " + (
            f"{w['at_once']:3d} responses at once, {w['batches']} batches, {w['step_s']:.3f} s a decode "
            f"step: {w['hours']:.1f} h" if w["at_once"] else "no room for one response"))
    verdict = "does NOT fit" if not plan["fits"] else \
        "every layer kept gathered" if plan["keep_gathered"] else "layers gathered by each forward"
    return out + [f"  gfpo.py takes: {verdict}"]
