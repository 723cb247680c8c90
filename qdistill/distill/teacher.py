"""The teacher side: a live frozen model, or its logits computed once and cached on disk.

On a CPU the teacher's forward costs as much as the student's whole step, so when the inputs do not
change between epochs (no augmentation) the logits are computed once, keyed by a hash of the
teacher's weights and of the data, and reused by every run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdistill.errors import QDistillError


def tensor_digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    return tensor_digest(*model.state_dict().values())


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: str | torch.device = "cpu", progress=None) -> torch.Tensor:
    """Logits of `model` in eval mode over `x`, batch by batch, returned on the CPU; `progress` is a rich Progress."""
    was_training = model.training
    model.eval()
    starts = range(0, len(x), batch_size)
    task = progress.add_task("teacher logits", total=len(starts), status="") if progress is not None else None
    out = []
    for i in starts:
        out.append(model(x[i : i + batch_size].to(device)).float().cpu())
        if task is not None:
            progress.advance(task)
    model.train(was_training)
    return torch.cat(out)


class LiveTeacher:
    """Runs the frozen teacher on every batch (needed with data augmentation)."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class CachedTeacher:
    """Looks up the teacher's logits of training example `index`."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def to(self, device) -> "CachedTeacher":
        self.logits = self.logits.to(device)
        return self

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return self.logits[index]

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, cache_dir: str | Path | None = None, device="cpu", progress=None) -> "CachedTeacher":
        """Compute the logits over `x`, or load them from `cache_dir` when this teacher and data were seen before."""
        path = None
        if cache_dir is not None:
            key = hashlib.sha256((model_digest(model) + tensor_digest(x)).encode()).hexdigest()[:24]
            path = Path(cache_dir) / f"teacher-logits-{key}.safetensors"
            if path.exists():
                try:
                    logits = load_file(path)["logits"]
                except Exception as e:  # a truncated cache is recomputed, not trusted
                    print(f"warning: ignoring unreadable teacher-logit cache {path}: {e}")
                else:
                    if logits.shape[0] == len(x):
                        return cls(logits)
        logits = predict(model, x, device=device, progress=progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # parallel builders do not share a temporary file
            save_file({"logits": logits.contiguous()}, tmp)
            tmp.replace(path)
        return cls(logits)


def check_compatible(teacher: nn.Module, student: nn.Module, sample: torch.Tensor) -> None:
    """Teacher and student must produce logits of the same shape on the same input."""
    with torch.no_grad():
        was = (teacher.training, student.training)
        teacher.eval(), student.eval()
        try:
            t, s = teacher(sample), student(sample)
        except Exception as e:
            raise QDistillError(f"teacher or student cannot run on the data (input shape {tuple(sample.shape)}): {e}") from e
        finally:
            teacher.train(was[0]), student.train(was[1])
    if t.shape != s.shape:
        raise QDistillError(
            f"teacher and student do not match: teacher outputs {tuple(t.shape)}, student outputs {tuple(s.shape)}"
        )
