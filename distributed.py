"""Data parallelism under torchrun, in a handful of calls that are no-ops in a world of one.

torchrun starts one process per device and sets WORLD_SIZE, RANK and LOCAL_RANK in each; a plain
`python train.py` is a world of one, needs no process group, and takes none of these paths.
"""
import contextlib
import os


def init(device):
    """(device, rank, world size): joins the process group when torchrun started us (nccl on
    CUDA, with this process's own GPU; gloo on CPU)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), world


def barrier(world):
    if world > 1:
        import torch.distributed as dist

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
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return tuple(t.tolist())


def sum_(tensor, world):
    """Sum a tensor over ranks, in place."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def gather(obj, world):
    """Every rank's obj, in rank order, on every rank."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def finish(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # rank 0 may still be writing: leave together
        dist.destroy_process_group()


class Silent:
    """Stands in for the TensorBoard writer on ranks other than 0."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None
