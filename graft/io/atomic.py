"""Atomic file writes: write a temporary file, fsync it, rename it over the target.

A reader (or a crash) never sees half a file: either the old version or the new one. What is
saved gets the permissions any tool's output gets (files 0o666, folders 0o777, less the umask),
whatever mode the writer inside used, and an output path is checked before the work that fills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graft.errors import GraftError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
FILE_MODE = 0o666 & ~UMASK


def check_output(
    path: str | Path, flag: str, folder: bool = False, overwrite: bool = True, example: str = ""
) -> Path:
    """Refuse an output that cannot be written, before the work that would fill it.

    ``flag`` names the option in the message (--output, --out...). A file output may replace a file
    but not a folder; a folder output may be new or an existing folder, and without ``overwrite``
    an empty one. Folders on the way are created later (``atomic_path``); the nearest one that
    exists must be a writable folder. ``example`` is a file name to suggest when a folder is given.
    """
    path = Path(path)
    if path.is_dir() and not folder:
        hint = f" (e.g. {path / example})" if example else ""
        raise GraftError(f"{path}: is a folder; {flag} takes a file name{hint}")
    if path.exists() and not path.is_dir() and folder:
        raise GraftError(f"{path}: is a file; {flag} takes a folder (a new or an existing one)")
    if folder and not overwrite and path.is_dir() and any(path.iterdir()):
        raise GraftError(f"{path}: folder is not empty (pass --overwrite to replace it)")
    # the file (or its temporary twin) is created in the parent: the nearest existing one must take it
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise GraftError(f"{parent}: is a file, so {flag} {path} cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GraftError(f"{parent}: permission denied (cannot write {flag} {path} there)")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp makes 0600 and some writers (safetensors) replace the file with their own 0600 one:
        # set the mode open() would give only now, once the writer is done
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        # name the file the user asked for, not its temporary twin (a full disk names no file at all)
        if e.filename is None or e.filename == str(tmp):
            e.filename, e.filename2 = str(path), None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder next to ``path`` to fill; on success it replaces ``path`` as a whole.

    The old folder is renamed aside and removed only once the new one is in place, so a crash
    leaves the old folder or the new one, never a mix (between the two renames, the old one waits
    under ``.NAME.old`` and the next call puts it back before anything else).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():  # killed between the two renames: the old one comes back
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
