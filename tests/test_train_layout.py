"""The training code stays in small parts: short functions, a small `finetune`, no import upwards from models."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from srbinarize.train.finetune import finetune

PACKAGE = Path(__file__).resolve().parents[1] / "srbinarize"


def test_no_function_in_train_is_longer_than_100_lines():
    long = []
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 100:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_finetune_takes_at_most_10_parameters():
    assert len(inspect.signature(finetune).parameters) <= 10


def test_nothing_in_models_imports_the_training_code():
    upward = []
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            upward += [f"{path.name}: {n}" for n in names if n.startswith(("srbinarize.train", "..train"))]
    assert not upward, upward
