"""The teacher side: a live frozen model, or its targets computed once and cached on disk.

On a CPU the teacher's forward costs as much as the student's whole step, so when the inputs do not
change between epochs (no augmentation) the targets are computed once, keyed by a hash of the
teacher's weights and of the data, and reused by every run: all logits of a classifier (one row
per image, in memory), the top-k log-probabilities per token of a language model (memory-mapped:
full logits for every token of a corpus would not fit).

A teacher is called with a batch (a dict of tensors, see `qdistill.tasks`) and returns the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdistill.distill.loss import TopKTarget
from qdistill.errors import QDistillError
from qdistill.files import check_cache_entry, replaced_whole
from qdistill.modes import evaluating

log = logging.getLogger(__name__)
TOPK_FILES = ("logprobs.npy", "indices.npy")  # a top-k cache folder's arrays, memory-mapped


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
    """Logits of `model` in eval mode over `x`, batch by batch, returned on the CPU; `progress(name, done, total)` is told each batch."""
    starts = range(0, len(x), batch_size)
    out = []
    with evaluating(model):
        for i in starts:
            out.append(model(x[i : i + batch_size].to(device)).float().cpu())
            if progress is not None:
                progress("teacher logits", len(out), len(starts))
    return torch.cat(out)


class LiveTeacher:
    """Runs the frozen teacher on every batch (needed with data augmentation); `forward(model, batch)`
    is the task's way of running a model, by default `model(batch["x"])`."""

    def __init__(self, model: nn.Module, forward=None):
        self.model = model.eval().requires_grad_(False)
        self.forward = forward or (lambda model, batch: model(batch["x"]))

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        return self.forward(self.model, batch)


class CachedTeacher:
    """Looks up the teacher's logits of training example `index`."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def to(self, device) -> "CachedTeacher":
        self.logits = self.logits.to(device)
        return self

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.logits[batch["index"]]

    @classmethod
    def build(cls, model: nn.Module, x: torch.Tensor, cache_dir: str | Path | None = None, device="cpu", progress=None) -> "CachedTeacher":
        """Compute the logits over `x`, or load them from `cache_dir` when this teacher and data were seen before."""
        path = None
        if cache_dir is not None:
            key = hashlib.sha256((model_digest(model) + tensor_digest(x)).encode()).hexdigest()[:24]
            path = Path(cache_dir) / f"teacher-logits-{key}.safetensors"
            if os.path.lexists(path):
                try:
                    check_cache_entry(path)
                    logits = load_file(path)["logits"]
                except Exception as e:  # a truncated cache, or one someone else could have written, is recomputed, not trusted
                    log.warning("ignoring the teacher-logit cache %s: %s", path, e)
                else:
                    if logits.shape[0] == len(x):
                        return cls(logits)
        logits = predict(model, x, device=device, progress=progress)
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                with replaced_whole(path, mode=0o600) as tmp:  # parallel builders do not share a temporary file
                    save_file({"logits": logits.contiguous()}, tmp)
            except OSError as e:
                raise QDistillError(f"cannot replace the teacher-logit cache {path} ({e.strerror}); remove it or set QDISTILL_CACHE to a folder of your own") from None
        return cls(logits)


class TopKTeacher:
    """Looks up the teacher's top-k log-probabilities for the positions of training window `index`.

    The arrays are memory-mapped [windows, positions, k]: at k = 32 a 3 M-token corpus takes
    3 M x 32 x 4 bytes = 384 MB on disk, where its full logits (8k vocabulary) would take 100 GB."""

    def __init__(self, logprobs: np.ndarray, indices: np.ndarray, temperature: float, device="cpu"):
        self.logprobs, self.indices, self.temperature, self.device = logprobs, indices, temperature, torch.device(device)

    def __call__(self, batch: dict) -> TopKTarget:
        rows = np.sort(batch["index"].cpu().numpy())  # memory-mapped rows read in file order ...
        order = torch.from_numpy(np.argsort(np.argsort(batch["index"].cpu().numpy())))  # ... and put back in the batch's
        logprobs = torch.from_numpy(self.logprobs[rows].astype(np.float32))[order]
        indices = torch.from_numpy(self.indices[rows].astype(np.int64))[order]
        return TopKTarget(logprobs.to(self.device), indices.to(self.device), self.temperature)

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, forward, batches, shape: tuple[int, int], vocab_size: int, k: int, temperature: float, data_key: str, cache_dir, device="cpu", progress=None) -> "TopKTeacher":
        """Run the teacher (`forward(model, batch)`) over `batches`, which cover windows 0..shape[0]-1 (each
        batch's "index"), keep the top `k` log-probabilities at `temperature` per position, and store them in
        `cache_dir`; or load them when this teacher, data, k and temperature were seen before."""
        n, length = shape
        key = hashlib.sha256(json.dumps([model_digest(model), data_key, n, length, k, temperature]).encode()).hexdigest()[:24]
        folder = Path(cache_dir) / f"teacher-topk-{key}"
        dtypes = (np.float16, np.uint16 if vocab_size <= 1 << 16 else np.int32)
        cached = _load_topk(folder, (n, length, k), dtypes)
        if cached is not None:
            return cls(*cached, temperature, device)
        if folder.is_symlink():  # an unreadable, mismatched or foreign earlier cache: a link is removed, not followed
            folder.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{folder.name}.tmp"))
        try:
            lp = np.lib.format.open_memmap(tmp / TOPK_FILES[0], mode="w+", dtype=dtypes[0], shape=(n, length, k))
            ix = np.lib.format.open_memmap(tmp / TOPK_FILES[1], mode="w+", dtype=dtypes[1], shape=(n, length, k))
            done = 0
            with evaluating(model):
                for batch in batches:
                    top = torch.log_softmax(forward(model, {name: v.to(device) for name, v in batch.items()}).float() / temperature, dim=-1).topk(k, dim=-1)
                    rows = batch["index"].numpy()
                    lp[rows] = top.values.cpu().numpy()
                    ix[rows] = top.indices.cpu().numpy()
                    done += len(rows)
                    if progress is not None:
                        progress("teacher top-k targets", done, n)
            lp.flush(), ix.flush()
            del lp, ix
            for name in TOPK_FILES:
                (tmp / name).chmod(0o600)  # numpy follows the umask: a group-writable cache would not be trusted
            try:
                tmp.replace(folder)
            except OSError:  # another process stored the same targets first: theirs are used
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        cached = _load_topk(folder, (n, length, k), dtypes)
        if cached is None:
            with contextlib.suppress(FileNotFoundError):
                check_cache_entry(folder, *(folder / name for name in TOPK_FILES))  # someone else's, which could not be replaced
            raise QDistillError(f"the teacher's top-k targets in {folder} could not be read back after writing them; check the disk")
        return cls(*cached, temperature, device)


def _load_topk(folder: Path, shape: tuple, dtypes: tuple) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached (log-probabilities, indices), or None when absent, not what was asked for or not this user's
    own (then rebuilt)."""
    if not os.path.lexists(folder):
        return None
    paths = [folder / name for name in TOPK_FILES]
    try:
        check_cache_entry(folder, *paths)
        arrays = [np.load(path, mmap_mode="r", allow_pickle=False) for path in paths]
    except (OSError, ValueError, EOFError, QDistillError) as e:
        log.warning("recomputing the teacher's top-k targets, the cache %s is unreadable: %s", folder, e)
        return None
    if all(a.shape == shape and a.dtype == d for a, d in zip(arrays, dtypes)):
        return arrays[0], arrays[1]
    log.warning("recomputing the teacher's top-k targets, the cache %s does not fit", folder)
    return None


def check_compatible(teacher: nn.Module, student: nn.Module, sample: dict, forward=None) -> None:
    """Teacher and student must produce outputs of the same shape on the same batch (`forward(model, batch)`)."""
    forward = forward or (lambda model, batch: model(batch["x"]))
    with torch.no_grad(), evaluating(teacher, student):
        try:
            t, s = forward(teacher, sample), forward(student, sample)
        except Exception as e:
            raise QDistillError(f"teacher or student cannot run on the data (input shape {tuple(sample['x'].shape)}): {e}") from e
    if t.shape != s.shape:
        raise QDistillError(
            f"teacher and student do not match: teacher outputs {tuple(t.shape)}, student outputs {tuple(s.shape)}"
        )
