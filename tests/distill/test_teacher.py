import errno
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import qdistill.files
from qdistill import CachedTeacher, LiveTeacher, QDistillError
from qdistill.distill import check_compatible, teacher
from qdistill.distill.teacher import TopKTeacher


def test_cache_is_reused_and_keyed_by_weights(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Linear(6, 3), torch.randn(50, 6)
    a = CachedTeacher.build(model, x, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    assert torch.allclose(a({"index": torch.arange(4)}), model(x[:4]))
    b = CachedTeacher.build(model, x, tmp_path)
    assert torch.equal(a.logits, b.logits) and len(list(tmp_path.iterdir())) == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    CachedTeacher.build(model, x, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2  # new weights, new entry


def test_truncated_cache_is_recomputed(tmp_path, caplog):
    model, x = nn.Linear(6, 3), torch.randn(50, 6)
    CachedTeacher.build(model, x, tmp_path)
    path = next(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:20])
    c = CachedTeacher.build(model, x, tmp_path)
    assert c.logits.shape == (50, 3)
    assert "ignoring the teacher-logit cache" in caplog.text


def test_live_teacher_is_frozen_eval():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    live = LiveTeacher(model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 4)
    assert torch.equal(live({"x": x}), live({"x": x}))


def test_mismatched_teacher_and_student():
    with pytest.raises(QDistillError, match=r"teacher outputs \(2, 10\), student outputs \(2, 5\)"):
        check_compatible(nn.Linear(3, 10), nn.Linear(3, 5), {"x": torch.randn(2, 3)})


FOREIGN = ["link", "owner", "writable", "folder"]
TOPK_FILES = ("logprobs.npy", "indices.npy")


def make_foreign(entry, how):
    """A cache entry (a file, or a folder: its first array) as someone else could have left it."""
    file = entry if entry.is_file() else next(entry.glob("*.npy"))
    if how == "link":
        os.replace(entry, entry.parent.parent / f"planted-{entry.name}")
        entry.symlink_to(entry.parent.parent / f"planted-{entry.name}")
    elif how == "owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(file, 12345, 12345)
    elif how == "writable":
        file.chmod(0o666)
    else:
        entry.chmod(0o777)


def refused(*args):
    raise PermissionError(errno.EPERM, "Operation not permitted")


@pytest.mark.parametrize("how", ["link", "owner", "writable"])
def test_a_logit_cache_others_could_have_written_is_recomputed(tmp_path, caplog, how):
    torch.manual_seed(0)
    model, x = nn.Linear(6, 3), torch.randn(50, 6)
    cache = tmp_path / "logits"
    CachedTeacher.build(model, x, cache)
    path = next(cache.iterdir())
    save_file({"logits": torch.zeros(50, 3)}, path)  # other targets, of the right shape
    make_foreign(path, how)
    caplog.clear()
    again = CachedTeacher.build(model, x, cache)
    assert torch.allclose(again.logits, model(x).detach()) and "ignoring the teacher-logit cache" in caplog.text
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == os.getuid()


def test_a_logit_cache_that_cannot_be_replaced_is_an_error(tmp_path, monkeypatch):
    model, x = nn.Linear(6, 3), torch.randn(50, 6)
    CachedTeacher.build(model, x, tmp_path)
    make_foreign(next(tmp_path.iterdir()), "writable")
    monkeypatch.setattr(qdistill.files.os, "replace", refused)  # as for another user's file in a sticky folder
    with pytest.raises(QDistillError, match="cannot replace the teacher-logit cache .*remove it or set QDISTILL_CACHE to a folder of your own"):
        CachedTeacher.build(model, x, tmp_path)


def build_topk(cache):
    """Top-3 targets at temperature 1 of a fixed 10-token model over 6 windows of 5 tokens."""
    torch.manual_seed(0)
    model, x = nn.Embedding(10, 10), torch.randint(0, 10, (6, 5))
    batches = [{"x": x[i : i + 3], "index": torch.arange(i, i + 3)} for i in (0, 3)]
    return TopKTeacher.build(model, lambda m, batch: m(batch["x"]), batches, (6, 5), 10, 3, 1.0, "data", cache)


@pytest.mark.parametrize("how", FOREIGN)
def test_a_topk_cache_others_could_have_written_is_recomputed(tmp_path, caplog, how):
    cache = tmp_path / "logits"
    want = build_topk(cache)
    want = np.array(want.logprobs), np.array(want.indices)
    folder = next(cache.iterdir())
    for name in TOPK_FILES:
        np.save(folder / name, np.zeros_like(np.load(folder / name)))  # other targets, of the right shape
    make_foreign(folder, how)
    caplog.clear()
    again = build_topk(cache)
    assert np.array_equal(again.logprobs, want[0]) and np.array_equal(again.indices, want[1])
    assert "recomputing the teacher's top-k targets" in caplog.text
    assert not folder.is_symlink() and [p.name for p in cache.iterdir()] == [folder.name]


def test_a_topk_cache_that_cannot_be_replaced_is_an_error(tmp_path, monkeypatch):
    build_topk(tmp_path)
    make_foreign(next(tmp_path.iterdir()), "writable")
    monkeypatch.setattr(teacher.shutil, "rmtree", lambda *a, **k: None)  # as for another user's folder
    with pytest.raises(QDistillError, match="can be written by other users, so it is not used; remove it or set QDISTILL_CACHE to a folder of your own"):
        build_topk(tmp_path)


def test_topk_cache_files_are_private_whatever_the_umask(tmp_path, caplog):
    """numpy writes with the umask's mode: under 002 the arrays would be group-writable, and then not trusted."""
    old = os.umask(0o002)
    try:
        build_topk(tmp_path / "logits")
    finally:
        os.umask(old)
    folder = next((tmp_path / "logits").iterdir())
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == dict.fromkeys(TOPK_FILES, 0o600)
    assert (tmp_path / "logits").stat().st_mode & 0o777 == 0o700
    build_topk(tmp_path / "logits")
    assert "WARNING" not in caplog.text
