"""Files users keep (models, checkpoints): written whole or not at all, and with the permissions of any
file they create. safetensors writes 0600 whatever the umask, so a shipped model would be unreadable
to the other accounts that serve it."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from qdistill.errors import QDistillError


def cache_dir() -> Path:
    """Where qdistill keeps what it makes once and reuses: data, teachers, cached targets, compiled kernels."""
    return Path(os.environ.get("QDISTILL_CACHE", Path.home() / ".cache" / "qdistill"))


def check_cache_entry(*paths: str | Path) -> None:
    """Raise unless each cache entry is this user's own: not a symbolic link, owned by the current uid and
    writable by no one else. Whoever can write an entry controls what is read from it (training targets,
    teachers, token streams), so one that fails is not used; for a folder, pass it and each file read."""
    for path in paths:
        st = os.lstat(path)
        why = "is a symbolic link" if stat.S_ISLNK(st.st_mode) else "belongs to another user" if st.st_uid != os.getuid() else "can be written by other users" if st.st_mode & 0o022 else None
        if why:
            raise QDistillError(f"cache entry {path} {why}, so it is not used; remove it or set QDISTILL_CACHE to a folder of your own")


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


@contextlib.contextmanager
def replaced_whole(path: str | Path, mode: int | None = None):
    """A fresh temporary path beside `path`, of an unpredictable name (`tempfile`), put in place of `path` by
    one rename when the block ends without error, else removed: a kill leaves the old file or the new one,
    never half of one, and a link planted at `path` (or at a fixed temporary name) is replaced, never
    written through. The file gets the permissions of any file the user creates, or `mode` (caches: 0600,
    since one others could write is not read back)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")  # the suffix: writers that read the format from it
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):  # left only when writing failed
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, whole or not at all and never through a link (`replaced_whole`)."""
    with replaced_whole(path) as tmp:
        tmp.write_text(text)


def open_unlinked(path: str | Path, mode: str = "a"):
    """Open a file of a run directory to append ("a") or cut back ("r+"), refusing a symbolic link in its
    place: a run directory may come from someone else, and what is written there must stay there."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_WRONLY | os.O_APPEND | os.O_CREAT if mode == "a" else os.O_RDWR)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise QDistillError(f"{path} is a symbolic link: qdistill writes only the run directory's own files; remove the link") from None
        raise
    return os.fdopen(fd, mode)


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, whole or not at all, with the usual permissions (`replaced_whole`)."""
    with replaced_whole(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
