import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Teacher and logit caches go to a temporary folder, never the user's."""
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))


def find_fashion_mnist() -> Path | None:
    """The folder the library reads Fashion-MNIST from when no --data-dir is given ($QDISTILL_DATA, else
    Debian's), or None where it holds no data; never the download the library falls back on."""
    from qdistill.data.fashion_mnist import DEBIAN_DIR, _find

    folder = Path(os.environ.get("QDISTILL_DATA") or DEBIAN_DIR)
    return folder if _find(folder) else None


@pytest.fixture
def fashion_mnist() -> Path:
    """The real Fashion-MNIST's folder; the test is skipped where the library would have to download it."""
    folder = find_fashion_mnist()
    if folder is None:
        pytest.skip("Fashion-MNIST not found in $QDISTILL_DATA or Debian's folder (apt-get install dataset-fashion-mnist)")
    return folder


def toy_dataset(n_train=512, n_test=256, classes=4, seed=0):
    """Separable 1x8x8 images: each class lights up its own quadrant, plus noise."""
    from qdistill.data import Dataset

    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.randint(0, classes, (n,), generator=g)
        x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
        for c in range(classes):
            r, col = divmod(c, 2)
            x[y == c, :, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.5
        return x, y

    (a, b), (c, d) = make(n_train), make(n_test)
    return Dataset(a, b, c, d, num_classes=classes, name="toy")


def toy_net(classes=4):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(128, classes)
    )


def toy_mlp(classes=4):
    """A model for toy_dataset with neither BatchNorm nor dropout: one process and several (torchrun) train it alike."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes))


# A dataset hook that arms a kill, then returns `data` (an expression, after `imports`): the process SIGKILLs
# itself when the metrics log records step $KILL_AT, as a kill from outside would, with nothing flushed or
# closed. Under torchrun only rank 0 logs, so rank 0 is the one killed.
KILLING_HOOK = """
import os, signal, sys
sys.path.insert(0, {root!r})
from qdistill import report
{imports}

def data():
    log = report.MetricsLog.__call__
    def killing(self, record):
        log(self, record)
        if record.get("step") == int(os.environ.get("KILL_AT", "-1")) and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)
    report.MetricsLog.__call__ = killing
    return {data}
"""
