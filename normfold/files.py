"""Where normfold writes, and how: checked before any work, switched atomically, cleaned up.

The promises (docs/reliability.md names the test that holds each):

1. :func:`check_target`: a path normfold writes is a regular file or absent, never a folder, a
   device, a FIFO or a socket, nor a link that leads out of its folder; its folder exists and
   can be written. :func:`same_file` tells two paths naming one file (same resolved path, or
   the same inode through a hard link).
2. :func:`write_atomic`: one file is written to a temporary name in its folder and renamed over
   the target, with the permissions a new file gets (``0666 & ~umask``: 0644 under umask 022).
3. :class:`Staging`: a model and its external data switch together. Both are written into a
   staging folder next to OUT; the data file has a fresh name (``<stem>.nf-<token><suffix>``)
   no earlier save used, so moving it in touches nothing an existing OUT reads; the model's
   rename is the commit point; only then are the data files of the replaced OUT that normfold
   wrote (fresh names) removed. A kill at any instant leaves OUT as the old model with its old
   data, or the new model with its new data. Commits in one folder hold an exclusive lock on
   the folder, so racing writers of one OUT leave one complete pair.
4. :func:`clean_stale`: staging folders and temporary files carry their owner's pid
   (``.normfold-<pid>-<token>``); the next write in that folder removes those whose owner is
   gone, and, for a staging folder killed mid-commit, the data file it had moved in (if its
   model never was) or the old data it had still to remove (if its model was).

``commit_hook``, when set, is called with the name of each commit step (``"staged"`` when all
files are written, ``"data"`` after the data files are in place, ``"model"`` after the model's
rename): a test stops a save there.
"""

from __future__ import annotations

__all__ = [
    "Staging",
    "check_target",
    "clean_stale",
    "commit_hook",
    "fresh_data_name",
    "is_fresh_data_name",
    "same_file",
    "write_atomic",
    "writing",
]

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from normfold.errors import InputError

try:
    import fcntl
except ImportError:  # Windows: commits are not serialized between processes
    fcntl = None  # type: ignore[assignment]

commit_hook: Callable[[str], None] | None = None

_PREFIX = ".normfold-"
_OWNED = re.compile(r"^\.normfold-(\d+)-[0-9a-f]+(\.tmp)?$")
_FRESH = re.compile(r"\.nf-[0-9a-f]{8}(\.[^.]*)?$")
_MANIFEST = "commit.json"


def check_target(path: str | os.PathLike) -> Path:
    """``path`` as a file normfold may write (rules 1 of the module doc), else :class:`InputError`.

    Callers check before any work, so a bad path costs nothing.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{target}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{target}: folder {folder} is not writable")
    if target.is_symlink() and target.resolve().parent != folder.resolve():
        raise InputError(f"{target}: is a link out of its folder (refused: normfold replaces OUT, never writes through)")
    try:
        mode = target.stat().st_mode  # what a link in the folder leads to
    except FileNotFoundError:
        return target
    if stat.S_ISDIR(mode):
        raise InputError(f"{target}: is a folder")
    if not stat.S_ISREG(mode):
        raise InputError(f"{target}: is not a regular file (a device, FIFO or socket); refusing to replace it")
    return target


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (resolved path, or one inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` into a temporary file in its folder, then rename it
    over ``path`` (rule 2); nothing is left behind on failure."""
    target = check_target(path)
    folder = target.parent
    clean_stale(folder)
    temp = folder / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with writing(target):
            descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(descriptor, "wb") as file:
                write(file)
            os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def fresh_data_name(name: str) -> str:
    """``name`` with a token no earlier save used: ``w.data`` -> ``w.nf-1a2b3c4d.data``."""
    path = Path(name)
    return f"{path.stem}.nf-{secrets.token_hex(4)}{path.suffix}"


def is_fresh_data_name(name: str) -> bool:
    """Whether ``name`` is one :func:`fresh_data_name` makes (a data file normfold wrote)."""
    return bool(_FRESH.search(name))


class Staging:
    """A staging folder next to a target, for a model and its data files (rule 3).

    Use as a context manager: write the files into :attr:`folder`, then :meth:`commit`. Leaving
    the block without a commit (an error) removes the staging folder and anything it moved in.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.parent = target.parent
        clean_stale(self.parent)
        self.folder = self.parent / f"{_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        with writing(target):
            self.folder.mkdir()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folder.exists():
            with _folder_lock(self.parent):
                _finish(self.folder, self.parent)

    def commit(self, data: Iterable[str], obsolete: Callable[[], Iterable[str]]) -> None:
        """Move the ``data`` files in, then the model (the commit point), then remove what
        ``obsolete()`` names: called under the folder's lock, it reads the OUT being replaced."""
        data = list(data)
        with writing(self.target), _folder_lock(self.parent):
            _hook("staged")
            old = sorted(set(obsolete()) - set(data))
            manifest = {"output": self.target.name, "data": data, "obsolete": old}
            (self.folder / _MANIFEST).write_text(json.dumps(manifest))
            for name in data:
                os.replace(self.folder / name, self.parent / name)
            _hook("data")
            os.replace(self.folder / self.target.name, self.target)
            _hook("model")
            _finish(self.folder, self.parent)


def clean_stale(folder: Path) -> None:
    """Remove the staging folders and temporary files in ``folder`` whose owner is gone (rule 4)."""
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.startswith(_PREFIX)]
    except OSError:
        return
    stale = [Path(entry.path) for entry in entries if _owner_gone(entry.name)]
    if not stale:
        return
    with _folder_lock(folder):
        for path in stale:
            if path.is_dir() and not path.is_symlink():
                _finish(path, folder)
            else:
                path.unlink(missing_ok=True)


def _finish(staging: Path, parent: Path) -> None:
    """Complete or undo what a staging folder's commit did, then remove the folder.

    The staged model still inside means the commit never happened: the data it moved in is
    unreferenced. The model gone means it was renamed over OUT: the old data goes.
    """
    manifest = staging / _MANIFEST
    if manifest.is_file():
        plan = json.loads(manifest.read_text())
        committed = not (staging / plan["output"]).exists()
        for name in plan["obsolete"] if committed else plan["data"]:
            if Path(name).name == name:  # never anything outside the folder
                (parent / name).unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def _owner_gone(name: str) -> bool:
    match = _OWNED.match(name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the folder itself: released when the holder dies, no lock file."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def writing(target: Path) -> Iterator[None]:
    """A full disk or a folder that refuses the write is the environment's problem (exit 2)."""
    try:
        yield
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG):
            raise InputError(f"{target}: cannot write: {error.strerror}") from None
        raise


def _hook(step: str) -> None:
    if commit_hook is not None:
        commit_hook(step)
