"""Writing files and directories so that a crash leaves the old version or the new one, never half.

Every writer of something a later run trusts (checkpoint records, exports, token shards) goes
through here: the content is written under a temporary name in the destination's own directory
(one file system, so the final `os.replace` is a rename), flushed to disk, renamed over the
final name, and the directory entry is flushed too. Created files and directories get the
usual umask permissions, like any other tool's output.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from contextlib import contextmanager
from typing import Iterator, Union


def fsync_directory(directory: str) -> None:
    """Flush a directory's entries (a rename inside it survives a power loss after this)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: str, kind: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def write_atomic(path: str, data: Union[bytes, str]) -> None:
    """Write `data` (text is UTF-8) to `path` through a flushed temporary file and a rename.

    Raises:
        OSError: of the same type and errno, naming `path` (not the temporary name).
    """
    tmp = _temporary_name(path, "tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write {os.path.abspath(path)}: {e.strerror or e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def _remove_stale(out_dir: str) -> None:
    """Temporary siblings of `out_dir` left by a killed writer (this module names them)."""
    parent, name = os.path.split(out_dir)
    for stale in glob.glob(os.path.join(parent, f".{glob.escape(name)}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_output_dir(out_dir: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary directory that becomes `out_dir` only if the block completes.

    With `overwrite`, an existing `out_dir` is moved aside, the new one renamed into place and
    only then the old one deleted: at every moment one complete version is on disk (between the
    two renames, under the hidden `.NAME.old-*` sibling).

    Raises:
        FileExistsError: `out_dir` exists and `overwrite` is False.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass --overwrite to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale(out_dir)
    tmp = _temporary_name(out_dir, "tmp")
    try:
        os.mkdir(tmp)  # umask permissions (tempfile.mkdtemp would make it private to this user)
    except OSError as e:  # name the directory the user gave, not our temporary sibling
        raise type(e)(e.errno, f"cannot write {out_dir}: {e.strerror} in {parent}") from e
    try:
        yield tmp
        if os.path.exists(out_dir):
            old = _temporary_name(out_dir, "old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
        fsync_directory(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
