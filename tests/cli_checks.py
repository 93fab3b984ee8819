"""A check the command-line tests share: a refused command is one line on stderr with exit code 2."""

from __future__ import annotations

from srbinarize.cli import main


def one_line_exit_2(argv: list[str], capsys, *needles: str) -> str:
    """Run ``srbinarize argv``; assert exit 2 and one error line (no traceback) holding each needle."""
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err
