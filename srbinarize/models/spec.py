"""`ModelSpec`: how to rebuild an FP architecture, stored beside the weights of every checkpoint.

A spec read from a file is data, never code: `ModelSpec.build` imports a class only from an allowed
architecture source, checked before anything is imported (importing a module already runs its code), and
only calls it when it is an ``nn.Module`` class. Allowed are the packages in `BUILTIN_SOURCES` (basicsr's
and spandrel's architectures, the project's own models) and what the caller names deliberately: the
``allow`` argument of `ModelSpec.build` / `srbinarize.checkpoint.load_model`, `allow_architectures` around
a block of calls, or ``--arch package.module:Class`` on the command line (which allows that class for that
command). An entry is either one ``package.module:Class`` or a whole package (``package``).
"""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SrbinarizeError
from .input_range import check_input_range, with_input_range

#: Packages whose nn.Module classes a file may name without being allowed explicitly.
BUILTIN_SOURCES: tuple[str, ...] = (
    "basicsr.archs",
    "spandrel.architectures",
    "spandrel_extra_arches.architectures",
    "srbinarize.models",
)

#: A described model may hold at most this many parameters and buffers (4 GiB as float32).
MAX_PARAMETERS = 1 << 30
#: Integer arguments of a described model (features, blocks, scale, ...) may be at most this large.
MAX_INTEGER_ARG = 1 << 16

_ALLOWED: ContextVar[tuple[str, ...]] = ContextVar("srbinarize_allowed_architectures", default=())


class ModelSpecError(SrbinarizeError):
    """An architecture that cannot be imported or built from its description, or is not allowed."""


@contextmanager
def allow_architectures(*entries: str | None) -> Iterator[None]:
    """Allow these architectures (``package.module:Class`` or a package) for the calls inside the block."""
    extra = tuple(e for e in entries if e)
    token = _ALLOWED.set(_ALLOWED.get() + extra)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def split_target(target: Any) -> tuple[str, str]:
    """``"package.module:Class"`` -> ``("package.module", "Class")``; anything else is a `ModelSpecError`."""
    if not isinstance(target, str):
        raise ModelSpecError(f"architecture must be a string 'package.module:Class', got {type(target).__name__}")
    module_name, sep, class_name = target.partition(":")
    if not sep or not class_name.isidentifier() or not all(p.isidentifier() for p in module_name.split(".")):
        raise ModelSpecError(f"architecture '{target}' must be written 'package.module:Class'")
    return module_name, class_name


def is_allowed(target: str, allow: Iterable[str] = ()) -> bool:
    """Whether ``target`` comes from a built-in source, ``allow``, or an `allow_architectures` block."""
    module_name, _ = split_target(target)
    for entry in (*BUILTIN_SOURCES, *_ALLOWED.get(), *allow):
        if ":" in entry:
            if entry == target:
                return True
        elif module_name == entry or module_name.startswith(entry + "."):
            return True
    return False


def check_allowed(target: str, allow: Iterable[str] = (), source: str = "") -> None:
    """Raise `ModelSpecError` unless ``target`` may be imported (see the module doc); imports nothing."""
    allow = tuple(allow)
    if is_allowed(target, allow):
        return
    where = f"{source} names" if source else "the model description names"
    raise ModelSpecError(
        f"{where} architecture '{target}', which is not from an allowed source ({', '.join(BUILTIN_SOURCES)}); "
        f"nothing was imported. If you trust it, allow it deliberately: --arch {target} on the command line, "
        f"or allow=['{target}'] in Python"
    )


def _integers(value: Any) -> Iterator[int]:
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _integers(v)
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _integers(v)


def _check_size(target: str, cls: type, kwargs: Mapping[str, Any], at: str) -> None:
    """Refuse a description that would build a huge model (a small file must not exhaust memory).

    Integer arguments above `MAX_INTEGER_ARG` are refused outright (they size loops and layers); then the
    model is built on the meta device (no memory) to count its parameters, when its constructor allows that.
    """
    big = [(k, i) for k, v in kwargs.items() for i in _integers(v) if abs(i) > MAX_INTEGER_ARG]
    if big:
        raise ModelSpecError(f"{at}{target}: argument {big[0][0]}={big[0][1]} is above {MAX_INTEGER_ARG}; "
                             "not a plausible size for an SR model")
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            meta = cls(**kwargs)
            count = sum(t.numel() for t in (*meta.parameters(), *meta.buffers()))
    except Exception:  # constructors that compute with tensor values cannot run on meta: built for real below
        return
    if count > MAX_PARAMETERS:
        raise ModelSpecError(f"{at}{target}(**{dict(kwargs)}) would hold {count:,} parameters, above "
                             f"{MAX_PARAMETERS:,}; not a plausible SR model")


@dataclass(frozen=True)
class ModelSpec:
    """An importable ``nn.Module`` class and the keyword arguments that build the FP model.

    ``target`` is ``"package.module:Class"`` (e.g. ``"basicsr.archs.edsr_arch:EDSR"``). ``input_range`` is
    the RGB range the network takes (1 or 255); `build` wraps a 255 network so that it takes [0, 1]
    (`srbinarize.models.input_range.ScaledRange`).
    """

    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_range: float = 1.0

    def build(self, allow: Iterable[str] = (), source: str = "") -> nn.Module:
        """The module, if its class is allowed (checked before any import) and is an ``nn.Module``.

        ``allow`` adds ``package.module:Class`` entries or packages to the allowed sources; ``source``
        names where the spec came from in error messages.
        """
        at = f"{source}: " if source else ""
        try:
            module_name, class_name = split_target(self.target)
        except ModelSpecError as err:
            raise ModelSpecError(f"{at}{err}") from None
        check_allowed(self.target, allow, source)
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise ModelSpecError(f"{at}keyword arguments of '{self.target}' must map names to values: {self.kwargs!r}")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise ModelSpecError(f"{at}cannot import architecture '{self.target}': {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ModelSpecError(f"{at}architecture '{self.target}' is a {type(cls).__name__}, not an nn.Module class")
        _check_size(self.target, cls, self.kwargs, at)
        try:
            model = cls(**self.kwargs)
        except Exception as err:  # a constructor rejects its arguments in many ways (TypeError, assert, ...)
            msg = f"{type(err).__name__}: {err}"
            raise ModelSpecError(f"{at}cannot build {self.target}(**{self.kwargs}): {msg}") from None
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{at}{self.target}(...) returned a {type(model).__name__}, not an nn.Module")
        return with_input_range(model, self.input_range)

    def to_json(self) -> str:
        data = {"target": self.target, "kwargs": self.kwargs}
        if self.input_range != 1.0:
            data["input_range"] = self.input_range
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "model description") -> ModelSpec:
        """Parse a stored spec; a malformed one is a `ModelSpecError` naming ``source``. Imports nothing."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as err:
            raise ModelSpecError(f"{source}: the model description is not valid JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("target"), str):
            raise ModelSpecError(f"{source}: the model description must be a JSON object with a 'target' string")
        kwargs = data.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ModelSpecError(f"{source}: the model description's 'kwargs' must be a JSON object")
        try:
            split_target(data["target"])
        except ModelSpecError as err:
            raise ModelSpecError(f"{source}: {err}") from None
        return cls(data["target"], kwargs, check_input_range(data.get("input_range", 1.0), f"{source}: input_range"))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], key: str, source: str) -> ModelSpec:
        """The spec stored under ``key`` in a file's metadata (``source`` names the file in errors)."""
        if key not in meta:
            raise ModelSpecError(f"{source}: no model description ('{key}') in its metadata")
        return cls.from_json(meta[key], source)
