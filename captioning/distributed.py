"""Data parallelism under torchrun, in a handful of calls that are no-ops in a world of one.

torchrun starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK in each; a plain
`python train.py` is a world of one, needs no process group, and takes none of these paths.
When another rank dies (SIGKILL, out of memory), the collective that notices ends this one with a
line naming the rank that was lost, instead of the backend's traceback.
"""
import contextlib
import os
import signal
import socket
import sys
import time

import torch
import torch.distributed as dist

from captioning import checkpoint


# (hostname, pid) of every rank, in rank order, once the process group is joined: the rank whose
# process has ended can then be named when a collective fails. Empty in a world of one.
_peers = []


def init(device):
    """(device, rank, world size): joins the process group when torchrun started us (nccl on
    CUDA, with this process's own GPU; gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _peers[:] = gather((socket.gethostname(), os.getpid()), world)
    return device, dist.get_rank(), world


def barrier(world):
    if world > 1:
        dist.barrier()


@contextlib.contextmanager
def first_then_others(first, world):
    """The ranks for which `first` is true run the block first (they write a file, fill a cache);
    the others wait, then run it and find the work done. Every rank meets one barrier."""
    if not first:
        barrier(world)
    yield
    if first:
        barrier(world)


def global_sum(values, world, device):
    """The values summed over ranks (one small all-reduce); the values themselves in a world of one."""
    if world == 1:
        return tuple(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(t.tolist())


def sum_(tensor, world):
    """Sum a tensor over ranks, in place."""
    if world > 1:
        dist.all_reduce(tensor)
    return tensor


def gather(obj, world):
    """Every rank's obj, in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def finish(world):
    if world > 1:
        dist.barrier()  # rank 0 may still be writing: leave together
        dist.destroy_process_group()


@contextlib.contextmanager
def one_line_if_a_rank_is_lost(output_dir):
    """A collective (or DDP's all-reduce) that fails because another rank died ends this rank with
    one line on stderr, from every rank that survives, and status 1 (SIGTERM's, when torchrun's
    lands during the exit that follows); anything else propagates as before."""
    try:
        yield
    except BaseException as e:
        if len(_peers) < 2 or not _caused_by_a_failed_collective(e):
            raise
        # torchrun's agent sends SIGTERM to the survivors once it sees a worker dead; it must not
        # cut this line short, nor turn it into the line of a stop (there is no checkpoint to write).
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        existing = checkpoint.list_checkpoints(output_dir)
        print(f"error: {_who_is_gone()}; "
              + (f"the checkpoints written before are intact (the newest is {existing[-1][1]}): "
                 f"run the same torchrun command with --resume" if existing else
                 "no checkpoint had been written yet: run the same torchrun command again"),
              file=sys.stderr, flush=True)
        sys.exit(1)


def _caused_by_a_failed_collective(e):
    """e, or an exception it interrupted (a stop signal landing while the failure unwinds), is the
    backend's: torch's DistError (what nccl raises; not run here), or gloo's RuntimeError (torch
    2.13 raises a plain one, "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ..."
    or "...pair.cc:537] Read error ...: Connection reset by peer", from collectives and DDP alike)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo/transport/" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _who_is_gone(wait=1.0):
    """The ranks on this machine whose process has ended, named at the first look that finds one
    (the survivors end soon after, and are not the cause); the backend may notice the closed
    connection before the dead process has finished ending, hence the short wait."""
    here, me = socket.gethostname(), os.getpid()
    local = [(rank, pid) for rank, (host, pid) in enumerate(_peers) if host == here and pid != me]
    deadline = time.monotonic() + wait
    while local:
        gone = [(rank, pid) for rank, pid in local if _ended(pid)]
        if len(gone) == 1:
            return f"rank {gone[0][0]} (process {gone[0][1]} on this machine) is gone"
        if gone:
            return (f"ranks {', '.join(str(r) for r, _ in gone)} (processes {', '.join(str(p) for _, p in gone)} "
                    f"on this machine) are gone")
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return "lost the connection to another process of the run (on another machine, or it had not failed yet)"


def _ended(pid):
    """True when the process is no more, or is a zombie its parent (torchrun) has not reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # the pid now belongs to someone else's process: not ours to judge
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True  # it ended between the two looks
    except OSError:
        return False  # no /proc (macOS): a zombie looks alive


class Silent:
    """Stands in for the TensorBoard writer on ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
