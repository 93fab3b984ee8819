"""The base of the errors srbinarize raises for bad input (a file, a layer, a key, a setting).

Each message says which and what was expected; the command line prints it as one line, no traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class SrbinarizeError(ValueError):
    """Bad input that the user can fix; subclasses say where it was found."""


class UsageError(SrbinarizeError):
    """A command-line or API value that cannot be used as given (an output onto an input, a bad option)."""


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: equal once resolved (symlinks, ``..``), or the same inode (hard links)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.resolve() == pb.resolve():
            return True
        return pa.exists() and pb.exists() and os.path.samefile(pa, pb)
    except (OSError, RuntimeError):
        return False


def check_output(output: str | os.PathLike, inputs: dict[str, str | os.PathLike], option: str = "output") -> Path:
    """Refuse an output path that is a folder or one of ``inputs`` (role -> path); returns it as a Path."""
    out = Path(output)
    if out.is_dir():
        raise UsageError(f"{option} {out} is an existing folder; give a file path")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"{option} {out}: {parent} is a file, not a folder")
    if parent is not None:
        import tempfile

        try:  # an unnamed file (O_TMPFILE where the OS has it): creating it is the only sure test
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as err:
            raise UsageError(f"{option} {out}: cannot write in {parent} ({err.strerror})") from None
    for role, path in inputs.items():
        if same_file(out, path):
            raise UsageError(f"{option} {out} is the {role} ({path}): it would be overwritten; give another path")
    return out
