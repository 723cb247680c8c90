"""The kernel cache: the compiled library is loaded only where it is this user's own file, opened once and
loaded through that descriptor, never through a link or from a folder others can write to."""

import os
from pathlib import Path

import pytest

from qdistill.runtime import lowbit

SYSTEM_LIBRARY = Path("/lib/x86_64-linux-gnu/libm.so.6")


@pytest.fixture
def built(tmp_path, monkeypatch):
    """The kernel built in a cache of its own; afterwards the cached `library()` is cleared, so later tests
    get the real library again. Every file ctypes loads is recorded (what its name resolves to)."""
    monkeypatch.setenv("QDISTILL_CACHE", str(tmp_path / "cache"))
    lowbit.library.cache_clear()
    if lowbit.library() is None:
        pytest.skip("qdistill's low-bit kernel does not build here (x86-64 with AVX2 and a C compiler)")
    real, loaded = lowbit.ctypes.CDLL, []
    monkeypatch.setattr(lowbit.ctypes, "CDLL", lambda name, *a, **k: loaded.append(os.path.realpath(name)) or real(name, *a, **k))
    lowbit.library.cache_clear()
    yield next((tmp_path / "cache" / "kernels").glob("lowbit-*.so")), loaded
    monkeypatch.undo()
    lowbit.library.cache_clear()


def test_own_library_is_loaded_through_its_descriptor(built):
    target, loaded = built
    assert lowbit.library() is not None and loaded == [str(target)]
    assert oct((target.parent.stat().st_mode) & 0o777) == "0o700"


@pytest.mark.skipif(not SYSTEM_LIBRARY.exists(), reason="no libm at the usual Debian path")
def test_a_link_to_a_system_library_is_not_loaded(built, caplog):
    target, loaded = built
    target.unlink()
    target.symlink_to(SYSTEM_LIBRARY)
    assert lowbit.library() is None
    assert not any(os.path.samefile(name, SYSTEM_LIBRARY) for name in loaded)
    assert "symbolic link" in caplog.text


@pytest.mark.parametrize("change", ["mode 666", "owner", "folder mode 777", "folder owner"])
def test_a_library_others_could_have_written_is_not_loaded(built, change, caplog):
    target, loaded = built
    if "owner" in change and os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    if change == "mode 666":
        target.chmod(0o666)
    elif change == "owner":
        os.chown(target, 12345, 12345)
    elif change == "folder mode 777":
        target.parent.chmod(0o777)
    else:
        os.chown(target.parent, 12345, 12345)
    assert lowbit.library() is None and loaded == []
    assert "others can write to it" in caplog.text
