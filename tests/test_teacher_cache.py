"""The cached teachers of `pipeline.get_teacher`: used only where they are this user's own files."""

import errno
import os

import pytest

from qdistill import QDistillError, TrainConfig, pipeline
from qdistill.files import cache_dir
from tests.conftest import toy_dataset

CFG = TrainConfig(method="fp", epochs=1)


@pytest.fixture
def trainings(monkeypatch):
    """The teachers trained, counted."""
    calls, real_train = [], pipeline.train
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    return calls


@pytest.mark.parametrize("how", ["link", "owner", "writable"])
def test_a_cached_teacher_others_could_have_written_is_retrained(tmp_path, caplog, trainings, how):
    data = toy_dataset(n_train=64, n_test=32)
    pipeline.get_teacher(data, "tiny", CFG)
    path = cache_dir() / "teachers" / pipeline.teacher_file_name(data, "tiny", CFG)
    if how == "link":
        os.replace(path, tmp_path / "planted.safetensors")
        path.symlink_to(tmp_path / "planted.safetensors")
    elif how == "owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a file to another user")
        os.chown(path, 12345, 12345)
    else:
        path.chmod(0o666)
    caplog.clear()
    pipeline.get_teacher(data, "tiny", CFG)
    assert len(trainings) == 2 and "retraining the teacher" in caplog.text
    assert not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == os.getuid()


def test_a_teacher_cached_under_any_umask_is_reused(caplog, trainings):
    """Saved with the umask's mode, a teacher would be group-writable under 002, and then never trusted."""
    data = toy_dataset(n_train=64, n_test=32)
    old = os.umask(0o002)
    try:
        pipeline.get_teacher(data, "tiny", CFG)
    finally:
        os.umask(old)
    assert (cache_dir() / "teachers").stat().st_mode & 0o777 == 0o700
    pipeline.get_teacher(data, "tiny", CFG)
    assert len(trainings) == 1 and "WARNING" not in caplog.text


def test_a_cached_teacher_that_cannot_be_replaced_is_an_error(monkeypatch, trainings):
    def refused(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(pipeline, "save_checkpoint", refused)  # as for another user's file in a sticky folder
    with pytest.raises(QDistillError, match="cannot replace the cached teacher .*remove it or set QDISTILL_CACHE to a folder of your own"):
        pipeline.get_teacher(toy_dataset(n_train=64, n_test=32), "tiny", CFG)
