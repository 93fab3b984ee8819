"""Writing a file safely: a temporary sibling, the permissions the umask gives, then an atomic rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write; on success it gets mode ``0o666 & ~umask`` and replaces
    ``path`` (an ordinary ``open`` would give the same mode; ``mkstemp`` alone gives 0600). On an error the
    temporary file is removed and ``path`` is untouched. ``suffix`` ends the temporary name (writers that
    pick the format from the extension, like matplotlib's, need the real one)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as err:  # name the file asked for, not the temporary one
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``text`` written to ``path`` through `atomic_output`."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)
