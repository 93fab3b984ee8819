"""Recipes: which layers a method replaces and with what, loaded from YAML and validated.

A recipe file has these sections (all but ``name`` and ``layers`` optional)::

    name: scales
    about: one paragraph on the method            # free text, shown by `srbinarize recipes`
    targets: {roles: [body], ...}                 # which layers are taken, see `Targets`
    layers:                                       # per layer kind: the replacement and its options
      conv2d: {type: scales, spatial_rescale: true, ...}
    calibration: {batches: 4, ...}                # see `Calibration`
    train: {lr: 2.0e-4, ...}                      # see `TrainSpec`; used by `srbinarize finetune`

Unknown keys and wrong types are errors naming the file and the key, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import SrbinarizeError
from .layers import LAYER_TYPES

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

LAYER_KINDS = ("conv2d", "linear", "add")
ROLES = ("head", "body", "tail")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "constant", "linear")
PROGRESSIVE_ORDERS = ("together", "weights_first")


class RecipeError(SrbinarizeError):
    """A recipe that cannot be loaded: names the file and the offending key."""


@dataclass(frozen=True)
class Targets:
    """Which layers a recipe takes."""

    roles: tuple[str, ...] = ("body",)
    # Convs whose input is a globally pooled vector (channel-attention squeeze/excite) stay FP unless set.
    include_pooled: bool = False
    min_kernel_size: int = 1
    # Layers (module names, as `srbinarize inspect` lists them) left FP whatever the rules above say: mixed
    # precision, e.g. chosen by srbinarize.analysis.choose_keep_fp.
    keep_fp: tuple[str, ...] = ()


@dataclass(frozen=True)
class Calibration:
    """Data used to initialise a converted layer from the FP model before any training."""

    batches: int = 2
    batch_size: int = 4
    patch_size: int = 48  # LR patch side


@dataclass(frozen=True)
class TrainSpec:
    """Finetuning defaults of a recipe (overridable on the command line)."""

    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    l1_weight: float = 1.0
    distill_weight: float = 1.0
    feature_distill_weight: float = 0.0
    # Share of the budget spent on block-wise reconstruction before end-to-end training (0: no such phase).
    reconstruct: float = 0.0
    reconstruct_lr: float = 5e-3
    # Share of the end-to-end steps over which the layers move from their FP equivalent to binary (0: binary
    # from the first step); see srbinarize.train.phases.end_to_end.BinarizationRamp.
    progressive: float = 0.0
    # together: the whole layer is blended; weights_first: over the first half of that share the FP side's
    # weights are binarized (FP activations), over the second half the binary layer is blended in.
    progressive_order: str = "together"
    # Learning rate of learnable quantizer intervals relative to their size (None: the network's lr);
    # see srbinarize.train.optim.
    interval_lr: float | None = None
    # Extra losses a recipe declares, name -> weight (e.g. FQSR's {sqcl: 0.3}).
    extra_losses: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every value is checked here, so a recipe file, ``--set train.*`` and a finetune override alike fail
        with the field's name before anything runs."""
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is unknown; expected one of {list(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is unknown; expected one of {list(SCHEDULES)}")
        _require(self.lr, "lr", "> 0", lambda v: v > 0)
        _require(self.reconstruct_lr, "reconstruct_lr", "> 0", lambda v: v > 0)
        if self.interval_lr is not None:
            _require(self.interval_lr, "interval_lr", "> 0 (or null: the network's lr)", lambda v: v > 0)
        for name in ("weight_decay", "l1_weight", "distill_weight", "feature_distill_weight"):
            _require(getattr(self, name), name, ">= 0", lambda v: v >= 0)
        for name, weight in self.extra_losses.items():
            _require(weight, f"extra_losses.{name}", ">= 0", lambda v: v >= 0)
        if not (isinstance(self.reconstruct, (int, float)) and 0 <= self.reconstruct <= 1):  # False for nan
            raise ValueError(f"reconstruct is the share of the budget for reconstruction, in [0, 1]; got "
                             f"{self.reconstruct!r}")
        if isinstance(self.progressive, bool) or not (isinstance(self.progressive, (int, float))
                                                       and 0 <= self.progressive < 1):  # False for nan
            raise ValueError(f"progressive is the share of the end-to-end steps spent moving from FP to binary, in "
                             f"[0, 1); got {self.progressive!r}")
        if self.progressive_order not in PROGRESSIVE_ORDERS:
            raise ValueError(f"progressive_order {self.progressive_order!r} is unknown; expected one of "
                             f"{list(PROGRESSIVE_ORDERS)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")


def _require(value: Any, name: str, expected: str, ok: typing.Callable[[float], bool]) -> None:
    """``value`` must be a finite number passing ``ok``; otherwise a ValueError naming ``name`` and ``expected``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


@dataclass(frozen=True)
class LayerSpec:
    """The replacement for one layer kind: a registered layer type and its validated config."""

    type: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    name: str
    layers: dict[str, LayerSpec]
    about: str = ""
    targets: Targets = Targets()
    calibration: Calibration = Calibration()
    train: TrainSpec = TrainSpec()
    source: str = "<memory>"

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `recipe_from_dict` turns back into this recipe (stored in checkpoints)."""
        out: dict[str, Any] = {
            "name": self.name,
            "about": self.about,
            "targets": _as_plain(self.targets),
            "calibration": _as_plain(self.calibration),
            "train": _as_plain(self.train),
            "layers": {k: {"type": s.type, **_as_plain(s.config)} for k, s in self.layers.items()},
        }
        return out

    def with_overrides(self, **overrides: Any) -> Recipe:
        """A copy with layer options (``skip=False``), targets (``roles=[...]``) or training defaults
        (``train.lr=5e-4``, written with the ``train.`` prefix) replaced.

        A key that is neither a targets field, a ``train.`` field nor an option of any layer is an error.
        """
        if not overrides:
            return self
        data = self.to_dict()
        train_fields = {f"train.{f.name}" for f in dataclasses.fields(TrainSpec)}
        used: set[str] = set()
        for key, value in overrides.items():
            if key in train_fields:
                data["train"][key.removeprefix("train.")] = value
                used.add(key)
            if key in data["targets"]:
                data["targets"][key] = value
                used.add(key)
            for layer in data["layers"].values():
                if key in layer and key != "type":
                    layer[key] = value
                    used.add(key)
        unknown = sorted(set(overrides) - used)
        if unknown:
            options = sorted({k for layer in data["layers"].values() for k in layer if k != "type"})
            raise RecipeError(
                f"recipe '{self.name}': unknown override(s) {unknown}; valid: targets fields "
                f"{sorted(data['targets'])}, layer options {options} and {sorted(train_fields)}"
            )
        return recipe_from_dict(data, source=f"{self.source} (with overrides {sorted(overrides)})")


def recipe_dir() -> Traversable:
    """The shipped recipe files: the installed package's ``srbinarize.recipes``, or, when the package is
    imported from a checkout (the repository root shadows an installed package), the checkout's ``recipes/``."""
    try:
        return resources.files("srbinarize.recipes")
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / "recipes"
        if not checkout.is_dir():
            raise RecipeError(f"no shipped recipes: neither the package srbinarize.recipes nor {checkout}") from None
        return checkout


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    return sorted(p.name[:-5] for p in recipe_dir().iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """Load a shipped recipe by name (``"scales"``) or any recipe file by path."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        try:
            source, content = str(path), path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(f"{path}: not a text (UTF-8) recipe file ({err.reason} at byte {err.start})") from None
    else:
        shipped = recipe_dir() / f"{text}.yaml"
        if not shipped.is_file():
            raise RecipeError(f"unknown recipe '{text}': shipped recipes are {builtin_recipes()}, or give a .yaml path")
        source, content = f"recipes/{text}.yaml", shipped.read_text()
    try:
        data = yaml.safe_load(content)
    except yaml.YAMLError as err:
        raise RecipeError(f"{source}: not valid YAML: {err}") from None
    return recipe_from_dict(data, source=source)


def recipe_from_dict(data: Any, source: str = "<dict>") -> Recipe:
    """Validate plain data (a parsed YAML file) into a `Recipe`."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
    allowed = {"name", "about", "targets", "layers", "calibration", "train"}
    _reject_unknown(source, "", data, allowed)
    for required in ("name", "layers"):
        if required not in data:
            raise RecipeError(f"{source}: missing required key '{required}'")
    name = _check(source, "name", data["name"], str)
    about = _check(source, "about", data.get("about", ""), str)
    layers_data = _check(source, "layers", data["layers"], dict)
    _reject_unknown(source, "layers.", layers_data, set(LAYER_KINDS))
    layers: dict[str, LayerSpec] = {}
    for kind, spec in layers_data.items():
        spec = dict(_check(source, f"layers.{kind}", spec, dict))
        if "type" not in spec:
            raise RecipeError(f"{source}: layers.{kind} needs a 'type' (one of {sorted(LAYER_TYPES)})")
        type_name = _check(source, f"layers.{kind}.type", spec.pop("type"), str)
        if type_name not in LAYER_TYPES:
            raise RecipeError(f"{source}: layers.{kind}.type '{type_name}' is unknown; known: {sorted(LAYER_TYPES)}")
        layer_type = LAYER_TYPES[type_name]
        if kind not in layer_type.kinds:
            raise RecipeError(f"{source}: layer type '{type_name}' replaces {layer_type.kinds}, not '{kind}'")
        layers[kind] = LayerSpec(type_name, _build(source, f"layers.{kind}", layer_type.config, spec))
    targets = _build(source, "targets", Targets, data.get("targets") or {})
    bad_roles = set(targets.roles) - set(ROLES)
    if bad_roles:
        raise RecipeError(f"{source}: targets.roles has {sorted(bad_roles)}; roles are {list(ROLES)}")
    return Recipe(
        name=name,
        about=about,
        layers=layers,
        targets=targets,
        calibration=_build(source, "calibration", Calibration, data.get("calibration") or {}),
        train=_build(source, "train", TrainSpec, data.get("train") or {}),
        source=source,
    )


def _build(source: str, where: str, cls: type, values: Any) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking every key and type."""
    values = _check(source, where, values, dict)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(source, f"{where}.", values, set(fields))
    hints = typing.get_type_hints(cls)
    kwargs = {key: _coerce(source, f"{where}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{source}: {where}: {err}") from None


def _coerce(source: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        seq = _check(source, key, value, (list, tuple))
        return tuple(_coerce(source, f"{key}[{i}]", v, item) for i, v in enumerate(seq))
    if origin is dict:
        key_t, val_t = typing.get_args(hint)
        mapping = _check(source, key, value, dict)
        return {_coerce(source, key, k, key_t): _coerce(source, f"{key}.{k}", v, val_t) for k, v in mapping.items()}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        return _coerce(source, key, value, options[0])
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise RecipeError(f"{source}: '{key}' must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if hint is float:
        return float(_check(source, key, value, (int, float)))
    return _check(source, key, value, hint)


def _check(source: str, key: str, value: Any, expected: type | tuple[type, ...]) -> Any:
    # bool is an int in Python; a recipe that writes `lr: true` is still wrong.
    is_bool = isinstance(value, bool)
    wants_bool = expected is bool or (isinstance(expected, tuple) and bool in expected)
    if not isinstance(value, expected) or (is_bool and not wants_bool):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise RecipeError(f"{source}: '{key}' must be {names}, got {type(value).__name__} ({value!r})")
    return value


def _reject_unknown(source: str, prefix: str, values: dict, allowed: set[str]) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise RecipeError(f"{source}: unknown key(s) {[prefix + k for k in unknown]}; allowed: {sorted(allowed)}")


def _as_plain(obj: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}
