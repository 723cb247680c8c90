"""Files users keep (models, checkpoints): written whole or not at all, and with the permissions of any
file they create. safetensors writes 0600 whatever the umask, so a shipped model would be unreadable
to the other accounts that serve it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def cache_dir() -> Path:
    """Where qdistill keeps what it makes once and reuses: data, teachers, cached targets, compiled kernels."""
    return Path(os.environ.get("QDISTILL_CACHE", Path.home() / ".cache" / "qdistill"))


def current_umask() -> int:
    """Read where Linux shows it; elsewhere set and restored at once (a thread creating a file in
    between would get mode 0666, so /proc is preferred)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary name beside `path`, set the usual permissions, then rename: a kill leaves the
    old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only when writing failed
