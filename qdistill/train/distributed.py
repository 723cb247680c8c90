"""Training under torchrun: one process per device, each on its share of every batch.

torchrun starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `join()` makes them one
process group (gloo for CPU tensors, NCCL for CUDA ones). The loop then shards each global batch
(`shard`: rank r takes the r-th of `world` near-equal slices, so the union is the single process's
batch), wraps the student in DistributedDataParallel for the step (gradients of the shadow weights
and of learned points are averaged), and reduces the reported loss. Rank 0 alone evaluates and writes
logs, checkpoints, packed files and reports. A library user who starts a process group of their own
gets the same behaviour: everything here reads torch.distributed's state.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from qdistill.errors import QDistillError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if active() else 0


def launched() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join(timeout_minutes: float = 60.0) -> None:
    """Join the launcher's process group (both backends: a CPU run uses gloo, a GPU run NCCL); a no-op
    for a single process or a group already joined. The timeout covers rank 0's evaluations and
    writes, which the other ranks wait for at the next collective."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise QDistillError("this PyTorch build has no torch.distributed: run without torchrun")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """Each rank on its own GPU (LOCAL_RANK) where the run asks for CUDA."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's slice of a global batch (every tensor cut the same way along its first dimension)
    and how many examples it holds. A rank left without one (a last batch smaller than the world)
    runs the batch's first example with 0 examples counted: its loss weight is 0, so its gradient
    adds nothing, but it still takes part in the gradient average."""
    rows = len(next(iter(batch.values())))
    if not active():
        return batch, rows
    mine = {k: v.tensor_split(world())[rank()] for k, v in batch.items()}
    local = len(next(iter(mine.values())))
    return (mine, local) if local else ({k: v[:1] for k, v in batch.items()}, 0)


def loss_weight(local_rows: int, global_rows: int) -> float:
    """What this rank's mean loss is scaled by so that DDP's average of the ranks' gradients is the
    gradient of the global batch's mean loss, also when the slices differ in size (the last batch)."""
    return world() * local_rows / global_rows


def global_mean(loss: torch.Tensor, local_rows: int, global_rows: int) -> torch.Tensor:
    """The global batch's mean loss from each rank's (detached, for the log and the guard: every rank
    then takes the same rollback decisions)."""
    if not active():
        return loss.detach()
    total = loss.detach() * (local_rows / global_rows)
    dist.all_reduce(total)
    return total


def wrap(model: nn.Module) -> nn.Module:
    """The student as the step runs it: DDP over its parameters that train now (a dq phase trains only
    the points). Unused parameters (a pooler the task never reads) are allowed."""
    if not active():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (builds a cache), the others after it (find it built)."""
    if active() and not is_main():
        dist.barrier()
    yield
    if active() and is_main():
        dist.barrier()


def on_main(fn, *args):
    """`fn(*args)` run by rank 0 alone (making a run directory), its result handed to every rank; a
    QDistillError it raises is raised on every rank, so no rank waits for one that has stopped."""
    if not active():
        return fn(*args)
    box = [None, None]
    if is_main():
        try:
            box[0] = fn(*args)
        except QDistillError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise QDistillError(box[1])
    return box[0]
