"""Fashion-MNIST from its IDX gzip files, found locally; downloaded only as a last resort."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from qdistill.data.dataset import Dataset
from qdistill.errors import QDistillError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
MEAN, STD = 0.2860, 0.3530
HOW_TO_GET = (
    "Fashion-MNIST not found. Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
    "t10k-labels-idx1-ubyte.gz in a folder given by --data-dir or $QDISTILL_DATA."
)


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzipped or not): magic 0x0000 08 <ndim>, big-endian sizes, then uint8 data."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise QDistillError(f"cannot read {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise QDistillError(f"{path} is not an IDX file of unsigned bytes (bad header)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    if len(raw) != start + int(np.prod(dims)):
        raise QDistillError(f"{path} is truncated or corrupt: header says {dims}, file has {len(raw) - start} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims)


def _find(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in FILES.items():
        for name in (stem + ".gz", stem):
            if (folder / name).exists():
                found[key] = folder / name
                break
        else:
            return None
    return found


def _download(folder: Path) -> dict[str, Path] | None:
    try:
        from torchvision.datasets import FashionMNIST
    except Exception:
        return None
    try:
        FashionMNIST(str(folder), train=True, download=True)
        FashionMNIST(str(folder), train=False, download=True)
    except Exception:
        return None
    return _find(folder / "FashionMNIST" / "raw")


def locate(data_dir: str | Path | None = None) -> dict[str, Path]:
    """--data-dir, then $QDISTILL_DATA, then Debian's folder, then a torchvision download into the user cache."""
    candidates = [Path(d) for d in (data_dir, os.environ.get("QDISTILL_DATA")) if d]
    for folder in candidates:
        found = _find(folder)
        if found is None:
            raise QDistillError(f"{folder} does not hold the four Fashion-MNIST IDX files. {HOW_TO_GET}")
        return found
    found = _find(DEBIAN_DIR) or _download(Path.home() / ".cache" / "qdistill" / "data")
    if found is None:
        raise QDistillError(HOW_TO_GET)
    return found


def load_fashion_mnist(data_dir: str | Path | None = None) -> Dataset:
    paths = locate(data_dir)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        if arrays[f"{split}_x"].ndim != 3 or arrays[f"{split}_y"].ndim != 1:
            raise QDistillError(f"Fashion-MNIST {split} files have unexpected shapes")

    def images(a):
        return ((torch.from_numpy(a.copy()).float() / 255 - MEAN) / STD).unsqueeze(1)

    return Dataset(
        images(arrays["train_x"]),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        images(arrays["test_x"]),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=10,
        name="fashion-mnist",
    )
