"""FSDP2 plumbing of the training stages (train.py: SSFT, gfpo.py: GFPO): a Hugging Face model loaded
once and sharded over the ranks, resumable sharded checkpoints, and the consolidated Hugging Face
export. Nothing here knows about the matching or the policy: each stage passes the module it wraps
around the model and the state it saves.

The recipe is the canonical one (pytorch/examples FSDP2, torchtitan): fully_shard each decoder layer,
then the root; build the optimiser after sharding; bf16 compute with fp32 gradient reduction on GPU.
"""
import copy
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from plumbing.ranks import all_max, print0
from plumbing.files import DataError, read_json, write_json


# ----------------------------------------------------------------------------- model

def attention_backend(layout, device):
    """batch layout: flash-attn when installed on CUDA, else PyTorch SDPA. concat layout: its tree
    mask needs FlexAttention on CUDA (a BlockMask, no dense L x L mask) and SDPA with a dense boolean
    mask on CPU, where FlexAttention has no backward."""
    if device.type != "cuda":
        return "sdpa"
    if layout == "concat":
        return "flex_attention"
    try:
        import flash_attn  # noqa: F401  (optional, used when installed)
        return "flash_attention_2"
    except ImportError:
        return "sdpa"


def checkpoint_layers(lm):
    """Activation checkpointing: each decoder layer recomputed in backward (non-reentrant). transformers
    5.24 names it activation_checkpointing_enable (the old name warns); 5.17 knows only the old one."""
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard(lm, device, wrap=None, activation_checkpointing=False, cpu_offload=False, cuda_policy=None,
          trainable=None):
    """wrap(lm) (the stage's module around the causal LM, e.g. match.SequenceNLL; lm itself without
    one) under FSDP2, the canonical recipe: fully_shard each decoder layer, then the root
    (embeddings, final norm, lm_head). bf16 compute with fp32 gradient reduction on GPU.
    cuda_policy: that mixed precision on any device (default: on CUDA only); plumbing/simulate.py
    asks for it on the fake CPU tensors that stand for a CUDA run's.
    trainable(name) -> bool: the parameters that keep requires_grad (None: all)."""
    for name, p in lm.named_parameters() if trainable else ():
        p.requires_grad_(trainable(name))
    if activation_checkpointing:
        checkpoint_layers(lm)
    model = wrap(lm) if wrap else lm
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if (device.type == "cuda" if cuda_policy is None else cuda_policy) else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    # the mesh of `device`'s type: without one fully_shard builds a CUDA mesh whenever CUDA exists,
    # and a CPU model (test_gpu's fp32 reference on a GPU host) would get its inputs moved to cuda:0
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in lm.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)
    return model


def load_model(source, rank, device, wrap=None, layout="batch", seed=0, activation_checkpointing=False,
               cpu_offload=False, trust_remote_code=False, edit=None, untie=False, trainable=None):
    """Returns (wrap(lm) under FSDP2, hf_config). source: a Hugging Face id or folder, or a function
    that builds a fresh model (the toy's random-init tiny Qwen2, seeded by `seed`). edit(full_model):
    run on rank 0 on the full model before it is sharded (train.py initialises the forking-token
    rows there); it may resize the vocabulary. untie: a model that ties its output rows to its input
    embeddings gets its own output matrix, a copy (gfpo.py --trainable tag_rows); trainable: as shard's.

    Only rank 0 reads the weights (a 32B model is not loaded as 8 CPU copies); the other ranks
    build the model on the meta device, and the full state dict is broadcast from rank 0 while
    each rank keeps its own shard (`broadcast_from_rank0`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    attn = attention_backend(layout, device)
    torch.manual_seed(seed)
    if callable(source):
        full = source() if rank == 0 else None
        config = source().config if rank != 0 else full.config
    else:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        full = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            trust_remote_code=trust_remote_code, attn_implementation=attn) if rank == 0 else None
    if rank == 0:
        if edit is not None:
            edit(full)
        if untie and full.get_output_embeddings().weight is full.get_input_embeddings().weight:
            full.get_output_embeddings().weight = torch.nn.Parameter(full.get_input_embeddings().weight.detach().clone())
            full.config.tie_word_embeddings = False
        config.vocab_size = full.get_input_embeddings().weight.shape[0]
        state = full.state_dict()
        buffers = {k: v for k, v in full.named_buffers()}
    rows = torch.tensor([config.vocab_size if rank == 0 else 0], device=device)
    dist.broadcast(rows, src=0)  # all ranks agree on the (possibly resized) vocabulary
    config.vocab_size = int(rows)
    config.use_cache = False
    config.tie_word_embeddings = config.tie_word_embeddings and not untie
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32,
                                              trust_remote_code=trust_remote_code)
    model = shard(lm, device, wrap, activation_checkpointing, cpu_offload, trainable=trainable)
    model.to_empty(device="cpu" if cpu_offload else device)
    prefix = next(name for name, module in model.named_modules() if module is lm)  # "lm" inside SequenceNLL
    state = {(f"{prefix}." if prefix else "") + k: v for k, v in state.items()} if rank == 0 else {}
    set_model_state_dict(model, state,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for prefix, module in lm.named_modules():  # non-persistent buffers (rotary inv_freq) are not in
        for name, buf in list(module.named_buffers(recurse=False)):  # the state dict: broadcast them
            value = buffers[f"{prefix}.{name}" if prefix else name].to(device) if rank == 0 \
                else torch.empty(buf.shape, dtype=buf.dtype, device=device)
            dist.broadcast(value, src=0)
            setattr(module, name, value)  # on the GPU even when parameters are offloaded
    return model, config


def save_final(model, tokenizer, config, path, rank, forks, shard_gib=2.0):
    """A consolidated bf16 Hugging Face directory: from_pretrained loads it, forking tokens intact,
    and ssft.json says how the model was prompted ({"fork_style", "num_forks"}: infer.py reads it).
    Written tensor by tensor from the sharded model, never as a whole: each tensor is gathered
    (a collective on every rank), cast to bf16 on rank 0's CPU and kept until its safetensors file
    of at most `shard_gib` GiB is written, so rank 0 holds one file's tensors and one gathered fp32
    tensor at a time, not the fp32 state dict beside a bf16 copy (196 GB at 32B).
    Written to a temporary name and renamed, so a half-written final/ never exists."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    seen, tensors = set(), []  # a tied lm_head is the embedding's own Parameter: written once
    lm = getattr(model, "lm", model)  # the causal LM inside the stage's wrapper
    for name, t in lm.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append((name, t))
    files, size = [[]], 0
    for name, t in tensors:  # the same plan on every rank: the shapes are global
        if files[-1] and size + 2 * t.numel() > shard_gib * 2 ** 30:
            files.append([])
            size = 0
        files[-1].append((name, t))
        size += 2 * t.numel()
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{k + 1:05d}-of-{len(files):05d}.safetensors" for k in range(len(files))]
    weight_map = {}
    for fname, group in zip(names, files):
        out = {}
        for name, t in group:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            if rank == 0:
                out[name] = full.detach().to("cpu", torch.bfloat16).contiguous()
                weight_map[name] = fname
            del full
        if rank == 0:
            save_file(out, os.path.join(tmp, fname), metadata={"format": "pt"})
        del out
    if rank == 0:
        if len(files) > 1:
            total = sum(2 * t.numel() for _, t in tensors)
            write_json(os.path.join(tmp, "model.safetensors.index.json"),
                       {"metadata": {"total_size": total}, "weight_map": weight_map})
        config = copy.deepcopy(config)
        config.use_cache = True  # training turned the KV cache off
        # vLLM and the hub pick the class from it; fully_shard renamed the class of a sharded root FSDP<name>
        config.architectures = [type(lm).__name__.removeprefix("FSDP") if isinstance(lm, FSDPModule) else type(lm).__name__]
        config.dtype = torch.bfloat16
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(os.path.join(tmp, "ssft.json"), forks)
        if os.path.isdir(path):  # keep the previous final/ until the new one is complete
            os.replace(path, path + ".old")
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    dist.barrier()


# ----------------------------------------------------------------------------- checkpoints

def clip_grad_norm(params, max_norm):
    """Clips the global gradient norm of `params` (sharded DTensors or plain tensors) to max_norm and
    returns the norm before clipping as a float, the same on every rank."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def checkpoints(out_dir):
    """[(step, path)] of the complete checkpoints, oldest first (a half-written one ends in .tmp,
    one that failed to load in .corrupt)."""
    root = os.path.join(out_dir, "checkpoints")
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted((int(d[5:]), os.path.join(root, d)) for d in names if re.fullmatch(r"step_\d+", d))


def save_checkpoint(model, optimizer, step, state, out_dir, rank, keep=2):
    """Sharded model + optimiser (torch.distributed.checkpoint) and the stage's own state, a JSON
    object written as trainer_state.json with "step" added. The data order and every sampled choice
    are pure functions of (seed, step), so `step` is all the RNG state. Once it is complete, only
    the newest `keep` complete checkpoints stay (prune_checkpoints; 0 keeps all): at 32B each is
    about 393 GB."""
    path = os.path.join(out_dir, "checkpoints", f"step_{step:06d}")
    if os.path.isdir(path):  # complete already (a rerun of a finished run)
        return path
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    if rank == 0:
        write_json(os.path.join(tmp, "trainer_state.json"), {"step": step, **state})
        os.replace(tmp, path)  # only a complete checkpoint gets a step_ name
        prune_checkpoints(out_dir, keep)
    dist.barrier()
    return path


def prune_checkpoints(out_dir, keep):
    """Deletes all but the newest `keep` complete checkpoints (keep 0: none deleted). Called after a
    checkpoint is complete, so a kill at any moment leaves at least one that loads; half-written
    (.tmp) and set-aside (.corrupt) ones are never touched here."""
    for _, old in checkpoints(out_dir)[:-keep] if keep else []:
        shutil.rmtree(old + ".del", ignore_errors=True)
        os.replace(old, old + ".del")  # no longer a step_ name: a kill mid-delete leaves no half checkpoint
        shutil.rmtree(old + ".del", ignore_errors=True)


def resume(model, optimizer, out_dir, rank, device, read_state):
    """(step, read_state(trainer_state)) of the newest checkpoint that loads, or (0, None) without
    one. A checkpoint that fails to load (truncated shards, a missing or unreadable
    trainer_state.json: read_state may raise) is named, set aside as step_N.corrupt (never deleted)
    and the one before it is tried. Raises DataError when checkpoints exist but none loads."""
    set_aside = []
    for step, path in reversed(checkpoints(out_dir)):
        try:
            trainer = read_json(os.path.join(path, "trainer_state.json"))
            state = read_state(trainer)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            loaded = {"model": model_sd, "optim": optim_sd}
            dcp.load(loaded, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
            error = None
        except (Exception, CheckpointException) as e:  # any failure to read it means: not usable
            e = next(iter(e.failures.values()), e) if isinstance(e, CheckpointException) else e  # rank's cause
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}"
        if all_max(error is not None, device) == 0:
            print0(f"resumed from {path} at step {trainer['step']}")
            return trainer["step"], state
        print0(f"warning: checkpoint {path} does not load ({error}); set aside as {path}.corrupt")
        if rank == 0:
            os.replace(path, path + ".corrupt")
        set_aside.append(path)
        dist.barrier()
    if set_aside:  # the model may hold part of a failed load: never train on from there
        raise DataError(f"{out_dir}: no checkpoint loads ({', '.join(set_aside)} set aside); "
                        "move the directory away to start afresh")
    return 0, None
