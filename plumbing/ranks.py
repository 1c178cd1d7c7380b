"""Processes: rank-0 printing, the process group (torchrun or a world of one), collectives of plain
numbers, and stop signals. The same script runs with `python` on one device and with `torchrun` on
many: a plain `python` run is a world of one, so every collective below runs either way.
"""
import os
import signal
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

from plumbing.files import DataError, lock_dir


def print0(*args):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


_OWN_GROUP = False  # whether init_distributed created the process group (and so may destroy it)


def init_distributed():
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE; plain `python` becomes a world of
    one, so the same collectives run either way. A group that already exists (a test driving the
    passes in-process) is used as it is."""
    global _OWN_GROUP
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"  # NCCL for GPU tensors, gloo for CPU ones
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True
    return dist.get_rank(), dist.get_world_size(), device


def close_distributed():
    """Destroys the process group if init_distributed created it, never someone else's. On a clean
    exit, or a stop every rank agreed on (exit code 0 or 128 + signal), the ranks first meet at a
    barrier: a rank that tears down its gloo pairs while another still finishes its last collective
    makes that rank abort ("terminate called without an active exception"). After an error on one
    rank alone there is no barrier, which would wait forever."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        error = sys.exc_info()[1]
        agreed = error is None or isinstance(error, SystemExit) and error.code in (0, None) \
            or isinstance(error, SystemExit) and isinstance(error.code, int) and error.code > 128
        if agreed and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    _OWN_GROUP = False


def all_max(x, device):
    """The maximum of an int (or bool) over the ranks."""
    t = torch.tensor([x], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def all_sum(values, device):
    """[float]: the element-wise sum of a list of numbers over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


STOP = []  # the signals received: SIGTERM (a scheduler about to preempt) or SIGINT (Ctrl-C)


def on_stop_signal(signum, frame):
    """First signal: the stage finishes its optimiser step, writes a checkpoint, exits. A second: stop at once."""
    if STOP:
        raise KeyboardInterrupt
    STOP.append(signum)
    print0(f"{signal.Signals(signum).name}: finishing this step, then a checkpoint (again to stop at once)")


@contextmanager
def stage_run(out_dir, rank):
    """The run of a training stage in `out_dir` on every rank: one run at a time (a lock held by rank 0;
    a second run exits naming the holder, on every rank) and SIGTERM/SIGINT recorded in STOP for the
    stage's loop to act on after its step. Restores the signal handlers and releases the lock on exit."""
    lock, refused = None, None
    try:  # a second run in the same directory would interleave logs and checkpoints
        lock = lock_dir(out_dir) if rank == 0 else None
    except DataError as e:
        refused = str(e)
    handlers = {s: signal.signal(s, on_stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    STOP.clear()
    try:
        refused = broadcast(refused)
        if refused:
            sys.exit(f"error: {refused}")
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if lock:
            lock.close()
