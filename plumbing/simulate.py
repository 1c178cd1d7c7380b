"""The memory of a training step measured without a GPU: `train.py --plan GPUSxGiB --simulate`.

The stage's own step (train.py: matching pass, training pass, clipping, fused AdamW) runs as rank 0
of G ranks on fake tensors. FakeTensorMode gives every tensor its shape, dtype and storage but no
data; the fake process group (backend "fake") answers every collective without a peer; so a 32B
model costs neither memory nor arithmetic. FSDPMemTracker (torch.distributed._tools) counts the
bytes of the tensors alive after each operation, which is what CUDA's caching allocator reports as
active memory (PyTorch's test_fsdp2_mem_tracker.py compares the two on GPUs; tests/test_gpu.py does
it for this step). This is the recipe of torchtitan's memory estimation, applied to this project's step:

  - CPU tensors under the CUDA policy (bf16 compute, fp32 gradient reduction): backward on fake CUDA
    tensors aborts on a CPU-only torch. Sizes are not rounded to the allocator's 512-byte blocks.
  - Token ids, labels, positions and what is computed from them alone keep their values (small real
    tensors), so data-dependent shapes (the labelled positions) are exact. Numbers computed from the
    weights have none: a cost or a loss the stage reads is zero, and the matching is Hungarian's on
    a zero cost matrix.
  - Attention runs as causal SDPA (the CPU's flash kernel) without a mask or position ids: the O(L)
    memory of flash-attn (batch layout) and FlexAttention (concat) on CUDA, not the dense L x L mask
    the CPU's concat path builds. An all-ones mask would anyway have to be passed as None.
  - Autograd sums two gradients of one tensor (lm_head's over the loss chunks) in place on CUDA and
    out of place on a tensor subclass: the simulation sums them in place.
  - DTensor's shape propagation runs ops on global shapes under the same fake mode: not counted.
  - With --cpu_offload the sharded weights, gradients and AdamW states live in host memory: not counted.
  - AdamW's state is made by one optimizer.step() on zero gradients, as after any first step; then
    one step of the stage is measured.
  - The peak of each phase grows linearly with the layers (sharded state, layer checkpoints): the
    step runs at two layer counts and a straight line gives the model's layers.

It cannot see the CUDA context and NCCL's buffers (about 1-2 GiB), the allocator's fragmentation and
rounding, kernels' workspaces (cuBLAS, flash-attn), nor where CUDA's attention kernels differ from the CPU's.
"""
import contextlib
import math
import re
import resource
import time

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from plumbing import concat, fsdp, memory

try:  # private modules: a torch without them skips the simulation, with the reason (missing())
    import torch.testing._internal.distributed.fake_pg as fake_pg  # registers the "fake" backend
    from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                               FakeTensor, FakeTensorMode, unset_fake_temporarily)
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._sharding_prop import ShardingPropagator
    ShardingPropagator._propagate_tensor_meta_non_cached  # noqa: B018  (the hook point of _uncounted)
    MISSING = None
except (ImportError, AttributeError) as e:
    FSDPMemTracker, MISSING = object, f"torch {torch.__version__} lacks {e}"

GIB = 2 ** 30
SMALL = 1 << 16  # elements: a result up to this size computed from real tensors alone is computed for real
HOST = ("Sharded Param", "Sharded Grad", "OptState")  # what --cpu_offload keeps in host memory
LAYER = re.compile(r"\.layers\.\d+$")  # a decoder layer's name (Hugging Face: model.layers.N)
_PROPAGATING = [False]  # True while DTensor computes an output's global shape


def missing():
    """None when this torch has the private modules the simulation needs, else a sentence saying which not."""
    return MISSING


def meta_model(config, layers, device="meta"):
    """The causal LM of `config` (a config.json as a dict, memory.read_config) cut to `layers` decoder
    layers: fp32 weights, SDPA attention, no KV cache; on the meta device (no memory: the simulation),
    or initialised on another (test_gpu's real step). Transformers' own architectures only."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = {k: v for k, v in config.items() if k not in ("layer_types", "architectures")}
    config = AutoConfig.for_model(**{**config, "num_hidden_layers": layers, "use_cache": False})
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def builder(config, device, wrap, activation_checkpointing, cpu_offload, lr, weight_decay):
    """build(layers) for measure(): the model of `config` cut to `layers` decoder layers, wrap()ped and
    sharded as a training stage shards it (under the CUDA precision policy whatever the device), its
    storage made on `device` (fake under the simulation), and its fused AdamW. Returns (model, optimizer)."""
    def build(layers):
        model = fsdp.shard(meta_model(config, layers), device, wrap, activation_checkpointing, cpu_offload,
                           cuda_policy=True)
        model.to_empty(device=device)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                                        fused=True)
    return build


def worst_case(max_len, layout, traces, num_forks, matching, micro_batch):
    """(encoded questions, fork ids) at the memory plan's worst case: M = `traces` traces a question, every
    training row max_len tokens after a prompt of memory.prompt_tokens (batch: prompt + tag + trace;
    concat: prompt + M x (tag + trace)), enough questions for two micro-batches (from the second on the
    sharded gradients are alive through the backward; more add nothing to the peak)."""
    prompt = [1] * memory.prompt_tokens(max_len)
    trace = [2] * (max_len - len(prompt) - 1 if layout == "batch" else max(1, (max_len - len(prompt) - traces) // traces))
    per_question = traces if matching == "sft" else min(num_forks, traces)  # the rows a question trains
    questions = math.ceil(2 * micro_batch / (per_question if layout == "batch" else 1))
    return [{"prompt_ids": prompt, "trace_ids": [trace] * traces}] * questions, [[3 + i] for i in range(num_forks)]


class _KeepData(TorchDispatchMode):
    """Under FakeTensorMode: an op whose tensors are all real and whose result is small (or has a
    data-dependent shape: nonzero, bincount), or that makes a small integer tensor from nothing, runs
    for real, so that token ids, labels and the indices of the labelled tokens keep their values. A
    small fp32 vector computed without gradients from fake tensors (per-sequence costs) becomes real
    zeros, and reading a fake number (.item()) gives zero, so that the stage's code that reads numbers
    (a matching, a logged loss) runs on."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor first unwraps into ops on its local tensors
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        fake = any(isinstance(t, FakeTensor) or t.is_meta for t in tensors)
        if func is torch.ops.aten._local_scalar_dense.default and fake:
            return False if args[0].dtype == torch.bool else 0.0 if args[0].is_floating_point() else 0
        if func.namespace in ("c10d", "_c10d_functional"):
            return func(*args, **kwargs)
        if not fake:
            try:
                out = func(*args, **kwargs)  # under the fake mode: the shapes only
            except (DynamicOutputShapeException, DataDependentOutputException):
                out = None
            if out is not None and not _small(out, integers=not tensors):  # a factory: token ids, not buffers
                return out
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten.add.Tensor and _sums_gradients(args, kwargs):
            return torch.ops.aten.add_.Tensor(*args)  # as autograd sums two gradients of a tensor on CUDA
        out = func(*args, **kwargs)
        if (not torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1 and not _PROPAGATING[0]
                and func.namespace == "aten" and not func._schema.is_mutable
                and all(r.alias_info is None for r in func._schema.returns) and _small(out, numbers=True)):
            with unset_fake_temporarily():
                return pytree.tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype), out)
        return out


def _sums_gradients(args, kwargs):
    """Whether an add in backward is autograd summing the gradients of a tensor used twice (lm_head over
    the cross-entropy chunks, the residual stream). On CUDA it sums in place when it holds the only
    reference; on a tensor subclass (fake tensors) never, which would count one more gradient."""
    return (torch._C._current_graph_task_id() != -1 and not torch.is_grad_enabled() and not kwargs
            and len(args) == 2 and all(isinstance(a, FakeTensor) for a in args)
            and args[0].shape == args[1].shape and args[0].dtype == args[1].dtype and args[0].is_contiguous()
            and args[0].storage_offset() == 0
            and args[0].untyped_storage().nbytes() == args[0].numel() * args[0].element_size())


def _small(out, integers=False, numbers=False):
    """Whether every tensor of `out` has at most SMALL elements (and, with integers, an integer or bool
    dtype; with numbers, fp32 and at most one dimension: per-token or per-sequence values, not weights)."""
    tensors = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return all(t.numel() <= SMALL and (not integers or not (t.is_floating_point() or t.is_complex()))
               and (not numbers or (t.dtype == torch.float32 and t.dim() <= 1)) for t in tensors)


class _PhaseTracker(FSDPMemTracker):
    """FSDPMemTracker that also keeps the peak of each phase: `phase` as the stage marks it, split by
    where the op runs (inside a decoder layer or outside: embeddings, final norm, loss) and by the
    direction (forward, backward). peaks[(phase, where)] = (bytes on the GPU, {category: bytes})."""

    def __init__(self, model, optimizer, offload):
        super().__init__(model, optimizer)
        self.phase, self.peaks, self.offload = None, {}, offload

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _PROPAGATING[0]:  # global shapes of DTensor's shape propagation: no memory of the step
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _update_peak_stats(self, peak_state):
        super()._update_peak_stats(peak_state)
        if self.phase is None:
            return
        snap = self._curr_mem_snap.get(torch.device("cpu"), {})
        snap = {getattr(k, "value", k): v for k, v in snap.items()}
        gpu = snap.get("Total", 0) - (sum(snap.get(c, 0) for c in HOST) if self.offload else 0)
        tracker = self._mod_tracker
        where = ("layers" if any(LAYER.search(p) for p in tracker.parents) else "outside the layers") + \
            (", backward" if tracker.is_bw else ", forward")
        key = (self.phase, where)
        if gpu > self.peaks.get(key, (-1,))[0]:
            self.peaks[key] = (gpu, snap)


@contextlib.contextmanager
def _uncounted_propagation():
    """DTensor's shape propagation flagged (_PROPAGATING): its global-shape tensors are not counted."""
    original = ShardingPropagator._propagate_tensor_meta_non_cached

    def flagged(self, *args, **kwargs):
        before, _PROPAGATING[0] = _PROPAGATING[0], True
        try:
            return original(self, *args, **kwargs)
        finally:
            _PROPAGATING[0] = before
    ShardingPropagator._propagate_tensor_meta_non_cached = flagged
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


@contextlib.contextmanager
def _cuda_attention(model):
    """Attention as the CUDA run's kernels hold it: no dense concat mask is built (CUDA builds a BlockMask
    of a few MiB) and the model is called without attention_mask and position_ids (transformers would
    otherwise build an L x L mask from position ids that restart, as the concat rows' do)."""
    import inspect
    names = list(inspect.signature(model.forward).parameters)

    def drop(module, args, kwargs):
        args = [None if i < len(names) and names[i] in ("attention_mask", "position_ids") else a
                for i, a in enumerate(args)]
        return tuple(args), {k: None if k in ("attention_mask", "position_ids") else v
                             for k, v in kwargs.items()}
    handle = model.register_forward_pre_hook(drop, with_kwargs=True, prepend=True)
    tree_attention, concat.tree_attention = concat.tree_attention, lambda branch_ids: None
    try:
        yield
    finally:
        concat.tree_attention = tree_attention
        handle.remove()


@contextlib.contextmanager
def _fake_world(world):
    """A fake process group of `world` ranks, this process rank 0. Raises RuntimeError when a process
    group exists already: the simulation needs a process of its own (tests run it in a subprocess)."""
    if dist.is_initialized():
        raise RuntimeError("the memory simulation needs a process without a process group")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=0, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def measure(build, step, layers, world, offload):
    """{(phase, where): (bytes per GPU, {tracker category: bytes})} of one optimiser step of rank 0 of
    `world` ranks, AdamW's state alive. build(layers) -> (model, optimizer): the stage's FSDP2 model
    with `layers` decoder layers and its optimiser, called under the fake mode (build on the meta
    device, shard, to_empty). step(model, optimizer, phase): one optimiser step of the stage;
    phase(name) marks where each of its phases begins."""
    if MISSING:
        raise RuntimeError(MISSING)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with _fake_world(world), fake, _KeepData(), _uncounted_propagation():
        model, optimizer = build(layers)
        tracker = _PhaseTracker(model, optimizer, offload)
        # transformers makes the embeddings' output require grad when checkpointing (for adapters), also
        # without grad: the tracker's module hooks would then keep the matching pass's hidden states alive
        detach = lambda m, args, out: None if torch.is_grad_enabled() else out.detach()  # noqa: E731
        hooks = [m.register_forward_hook(detach) for m in model.modules()
                 if isinstance(m, torch.nn.Embedding)]
        with tracker, _cuda_attention(model):
            # the tracker's per-module statistics hold one forward of the root: cleared before each
            hooks.append(model.register_forward_pre_hook(lambda *a: tracker.reset_mod_stats(), prepend=True))
            for p in model.parameters():  # AdamW's state as after a first step, without running one
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step(model, optimizer, lambda name: setattr(tracker, "phase", name))
            tracker.phase = None
            for h in hooks:
                h.remove()
        return tracker.peaks


def simulate(build, step, layers, world, offload, probes=(3, 4)):
    """The peak GiB per GPU of each phase at `layers` decoder layers: measure() at the two layer counts of
    `probes` and a straight line through them (line()), or measured directly when layers <= the larger.
    From 3 layers on every layer has neighbours to prefetch; 32B's peaks at 3, 4, 5 and 8 layers lie on
    one line. Returns line()'s {"phases", "categories"} and "probes", "seconds" (wall time) and
    "host_gib" (this process's peak resident memory)."""
    t0 = time.perf_counter()
    probes = (layers,) if layers <= max(probes) else probes
    result = line({n: measure(build, step, n, world, offload) for n in probes}, layers)
    return {**result, "probes": list(probes), "seconds": time.perf_counter() - t0,
            "host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def line(runs, layers):
    """{"phases": {(phase, where): GiB}, "categories": {(phase, where): {tracker category: GiB}}} at
    `layers` on the straight line through two measure() results, runs = {layer count: result} (one
    result: itself). The peak of each phase grows linearly with the layers: the sharded state and the
    layer checkpoints do, nothing else depends on them."""
    (n1, r1), (n2, r2) = (list(runs.items()) * 2)[:2] if len(runs) == 1 else sorted(runs.items())
    slope = 0 if n1 == n2 else (layers - n1) / (n2 - n1)
    at = lambda a, b: (b if n1 == n2 else a + (b - a) * slope) / GIB  # noqa: E731
    phases, categories = {}, {}
    for key, (total, snap) in r2.items():
        first, first_snap = r1.get(key, (0, {}))
        phases[key] = at(first, total)
        categories[key] = {c: g for c, g in ((c, at(first_snap.get(c, 0), x)) for c, x in snap.items())
                           if c != "Total" and abs(g) >= 0.005}
    return {"phases": phases, "categories": categories}


def phase_peaks(sim):
    """{phase: GiB} of a simulate() result, named as memory.train_plan's phases: a phase that ran a
    backward splits into "layers forward", "loss" (outside the layers: embeddings, final norm, loss,
    forward and backward) and "layers backward"; any other keeps its name (its largest moment)."""
    out = {}
    for (phase, where), gib in sim["phases"].items():
        if any(p == phase and w.endswith("backward") for p, w in sim["phases"]):
            phase = "loss" if where.startswith("outside") else f"layers {where.split(', ')[1]}"
        out[phase] = max(out.get(phase, 0.0), gib)
    return out

