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
import sys

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


def launched_rank() -> int:
    """This process's rank as the launcher set it (before the group is joined)."""
    return int(os.environ.get("RANK", "0") or 0)


class RelayedError(QDistillError):
    """Rank 0's error, raised on the other ranks too (so they stop instead of waiting): printed by rank 0 alone."""


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
    """Each rank on its own GPU (LOCAL_RANK) where the run asks for CUDA, whatever index it names."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def counted(batch: dict[str, torch.Tensor]) -> int:
    """What a task's loss is a mean over: the labels that count (a language model's real tokens, padding
    being -100), or the examples where a batch has no labels."""
    return int((batch["y"] != -100).sum()) if "y" in batch else len(batch["x"])


def shard(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's slice of a global batch (every tensor cut the same way along its first dimension)
    and what its loss is a mean over (`counted`). A rank left without an example (a last batch smaller
    than the world) runs the batch's first one with 0 counted: its loss weight is 0, so its gradient
    adds nothing, but it still takes part in the gradient average."""
    if not active():
        return batch, counted(batch)
    mine = {k: v.tensor_split(world())[rank()] for k, v in batch.items()}
    if len(next(iter(mine.values()))) == 0:
        return {k: v[:1] for k, v in batch.items()}, 0
    return mine, counted(mine)


def loss_weight(mine: int, total: int) -> float:
    """What this rank's mean loss (over its `mine` of the batch's `total` counted labels) is scaled by so
    that DDP's average of the ranks' gradients is the gradient of the global batch's mean loss, also when
    the slices differ in size (the last batch) or in padding."""
    return world() * mine / total if total else 0.0


def global_mean(loss: torch.Tensor, mine: int, total: int) -> torch.Tensor:
    """The global batch's mean loss from each rank's (detached, for the log and the guard: every rank
    then takes the same rollback decisions)."""
    if not active():
        return loss.detach()
    part = loss.detach() * (mine / total if total else 0.0)
    dist.all_reduce(part)
    return part


def wrap(model: nn.Module) -> nn.Module:
    """The student as the step runs it: DDP over its parameters that train now (a dq phase trains only
    the points), or the model itself where it is sharded (FSDP2 reduces its own gradients). Unused
    parameters (a pooler the task never reads) are allowed."""
    if not active() or is_sharded(model):
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)


def shard_weights(model: nn.Module) -> None:
    """FSDP2 (`parallel: fsdp`): each rank holds 1/w of every weight, of its gradient and of its
    optimizer state. Each block of a ModuleList (a transformer's layers) is gathered for its own forward
    and backward only, the rest (embeddings, a head tied to them) with the whole model. The quantizer,
    a parametrization of the weight, runs after the gather, so each bucket's range is the full tensor's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.utils.parametrize import ParametrizationList

    mesh = init_device_mesh(next(model.parameters()).device.type, (world(),))
    for module in reversed(list(model.modules())):  # inner blocks before the blocks holding them, as fully_shard wants
        if isinstance(module, nn.ModuleList) and not isinstance(module, ParametrizationList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_dtensor(value) -> bool:
    """A shard of a sharded (FSDP2) model's tensor; torch.distributed is imported only once a run asks."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def holds_shards(state: dict) -> bool:
    """Whether a model state is a sharded model's own (DTensors), as the guard's rollback point is."""
    return any(is_dtensor(v) for v in state.values())


def full_state(model: nn.Module, opt=None) -> tuple[dict, dict | None]:
    """A sharded model's whole state (and its optimizer's), gathered onto rank 0's CPU (the other ranks
    get empty dicts): what a checkpoint and a packed file hold. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options) if opt is not None else None


def load_full_state(model: nn.Module, model_state: dict, opt=None, opt_state: dict | None = None) -> None:
    """Put a whole state (from a checkpoint every rank has read) into a sharded model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    if opt is not None:
        set_optimizer_state_dict(model, opt, opt_state, options=options)


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (builds a cache), the others after it (find it built). If it fails
    on rank 0, the others raise its error instead of waiting for it."""
    if not active():
        yield
        return
    box = [None]
    if is_main():
        try:
            yield
        except BaseException as e:
            box[0] = str(e) if isinstance(e, QDistillError) else f"rank 0 stopped: {type(e).__name__}: {e}"
            dist.broadcast_object_list(box, src=0)
            raise
        dist.broadcast_object_list(box, src=0)
        return
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RelayedError(box[0])
    yield


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
        raise RelayedError(box[1])
    return box[0]


def broadcast(value):
    """Rank 0's value of a picklable object, on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
