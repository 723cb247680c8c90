import gzip

import numpy as np
import pytest
import torch

from qdistill import QDistillError
from qdistill.data import batches, load_fashion_mnist, random_shift_flip
from qdistill.data.fashion_mnist import DEBIAN_DIR, FILES, _find, locate, read_idx
from tests.conftest import find_fashion_mnist


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(folder, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    write_idx(folder / (FILES["train_x"] + ".gz"), rng.integers(0, 255, (n_train, 28, 28)))
    write_idx(folder / (FILES["train_y"] + ".gz"), rng.integers(0, 10, (n_train,)))
    write_idx(folder / (FILES["test_x"] + ".gz"), rng.integers(0, 255, (n_test, 28, 28)))
    write_idx(folder / (FILES["test_y"] + ".gz"), rng.integers(0, 10, (n_test,)))


def test_loads_from_data_dir(tmp_path):
    fake_fashion(tmp_path)
    d = load_fashion_mnist(tmp_path)
    assert d.train_x.shape == (20, 1, 28, 28) and d.test_y.shape == (10,) and d.num_classes == 10


def test_env_variable_is_searched(tmp_path, monkeypatch):
    fake_fashion(tmp_path)
    monkeypatch.setenv("QDISTILL_DATA", str(tmp_path))
    assert len(load_fashion_mnist().train_x) == 20


def test_tests_look_for_the_data_where_the_library_does(tmp_path, monkeypatch):
    monkeypatch.delenv("QDISTILL_DATA", raising=False)
    assert find_fashion_mnist() == (DEBIAN_DIR if _find(DEBIAN_DIR) else None)
    fake_fashion(tmp_path)
    monkeypatch.setenv("QDISTILL_DATA", str(tmp_path))
    assert find_fashion_mnist() == tmp_path and locate()["train_x"].parent == tmp_path
    monkeypatch.setenv("QDISTILL_DATA", str(tmp_path / "empty"))  # the library stops here, it does not fall back on Debian's
    assert find_fashion_mnist() is None
    with pytest.raises(QDistillError, match="does not hold"):
        locate()


def test_real_files(fashion_mnist):
    d = load_fashion_mnist(fashion_mnist)
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(d.train_y).tolist() == [6000] * 10 and torch.bincount(d.test_y).tolist() == [1000] * 10
    assert abs(d.train_x.mean().item()) < 0.01 and abs(d.train_x.std().item() - 1) < 0.01  # normalized with the data's own mean and std


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(QDistillError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_truncated_file_is_named(tmp_path):
    fake_fashion(tmp_path)
    path = tmp_path / (FILES["train_x"] + ".gz")
    raw = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(QDistillError, match="truncated or corrupt"):
        load_fashion_mnist(tmp_path)


def test_not_gzip_or_not_idx(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(QDistillError, match="cannot read"):
        read_idx(bad)
    plain = tmp_path / "x"
    plain.write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(QDistillError, match="bad header"):
        read_idx(plain)


def test_batches_cover_every_example_once():
    x, y = torch.arange(10).float().view(10, 1), torch.arange(10)
    seen = torch.cat([idx for _, _, idx in batches(x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))


def test_augmentation_shifts_within_the_padding():
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    out = random_shift_flip(x, pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.all(out.sum((1, 2, 3)) == 4)  # the blob is moved, never cut
