"""Recipes are data: loading, validation errors that name the file and key, overrides."""

from __future__ import annotations

import os

import pytest
import yaml
from torch import nn

import srbinarize
from srbinarize.recipe import RecipeError, builtin_recipes


def _write(tmp_path, data) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_every_shipped_recipe_loads():
    names = builtin_recipes()
    assert "scales" in names
    for name in names:
        recipe = srbinarize.load_recipe(name)
        assert recipe.name and recipe.layers


def test_scales_defaults_match_the_paper_components():
    conv = srbinarize.load_recipe("scales").layers["conv2d"]
    assert conv.type == "scales"
    cfg = conv.config
    assert cfg.binarize_weights and cfg.binarize_activations and cfg.spatial_rescale and cfg.channel_rescale
    assert cfg.channel_kernel_size == 5


def test_user_recipe_file_without_code(tmp_path):
    """A new recipe (SCALES with only the LSF part: the paper's first ablation row) is a file, no code."""
    data = srbinarize.load_recipe("scales").to_dict()
    data["name"] = "lsf_only"
    data["layers"]["conv2d"].update(spatial_rescale=False, channel_rescale=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1))
    binary = srbinarize.convert(model, _write(tmp_path, data))
    assert binary.get_submodule("1").spatial is None and binary.get_submodule("1").channel is None


def test_unknown_recipe_name():
    with pytest.raises(RecipeError, match=r"unknown recipe 'scalez'.*scales"):
        srbinarize.load_recipe("scalez")


def test_unknown_key_names_file_and_key(tmp_path):
    data = srbinarize.load_recipe("scales").to_dict()
    data["layers"]["conv2d"]["spatial_kernal_size"] = 3
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError, match=r"mine\.yaml.*layers\.conv2d\.spatial_kernal_size"):
        srbinarize.load_recipe(path)


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("conv2d", "spatial_rescale", "yes", "bool"),
        ("conv2d", "channel_kernel_size", 2.5, "int"),
        ("conv2d", "skip", "sometimes", "one of"),
        ("conv2d", "channel_kernel_size", 4, "odd"),
    ],
)
def test_wrong_type_names_file_and_key(tmp_path, section, key, value, expected):
    data = srbinarize.load_recipe("scales").to_dict()
    data["layers"][section][key] = value
    with pytest.raises(RecipeError, match=rf"mine\.yaml.*{expected}"):
        srbinarize.load_recipe(_write(tmp_path, data))


def test_bad_top_level_and_layer_type(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key.*'layer'"):
        srbinarize.load_recipe(_write(tmp_path, {"name": "x", "layer": {}}))
    with pytest.raises(RecipeError, match=r"layers\.conv2d\.type 'nope' is unknown"):
        srbinarize.load_recipe(_write(tmp_path, {"name": "x", "layers": {"conv2d": {"type": "nope"}}}))
    with pytest.raises(RecipeError, match=r"targets\.roles"):
        srbinarize.load_recipe(_write(tmp_path, {"name": "x", "targets": {"roles": ["neck"]},
                                                 "layers": {"conv2d": {"type": "scales"}}}))


def test_overrides_and_unknown_override():
    recipe = srbinarize.load_recipe("scales").with_overrides(spatial_rescale=False, roles=["body", "tail"])
    assert recipe.layers["conv2d"].config.spatial_rescale is False
    assert recipe.targets.roles == ("body", "tail")
    with pytest.raises(RecipeError, match=r"unknown override.*spatial_rescal\b"):
        srbinarize.load_recipe("scales").with_overrides(spatial_rescal=False)
    trained = srbinarize.load_recipe("fqsr").with_overrides(**{"train.lr": 1e-3, "train.extra_losses": {"sqcl": 0.3}})
    assert trained.train.lr == 1e-3 and trained.train.extra_losses == {"sqcl": 0.3}
    with pytest.raises(RecipeError, match=r"train\.lr. must be int or float, got str"):
        srbinarize.load_recipe("fqsr").with_overrides(**{"train.lr": "fast"})
    with pytest.raises(RecipeError, match=r"unknown override.*train\.lrr"):
        srbinarize.load_recipe("fqsr").with_overrides(**{"train.lrr": 1e-3})


def test_round_trip_through_plain_data():
    recipe = srbinarize.load_recipe("scales")
    again = srbinarize.recipe.recipe_from_dict(recipe.to_dict())
    assert again.layers == recipe.layers and again.targets == recipe.targets and again.train == recipe.train


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("train.optimizer", "adamx", r"optimizer 'adamx' is unknown; expected one of \['adam', 'adamw', 'sgd'\]"),
    ("train.schedule", "step", r"schedule 'step' is unknown"),
    ("train.lr", -1, r"lr must be a finite number > 0, got -1.0"),
    ("train.lr", float("nan"), r"lr must be a finite number > 0, got nan"),
    ("train.weight_decay", -0.1, r"weight_decay must be a finite number >= 0"),
    ("train.distill_weight", float("inf"), r"distill_weight must be a finite number >= 0, got inf"),
    ("train.extra_losses", {"sqcl": -1}, r"extra_losses.sqcl must be a finite number >= 0"),
    ("train.reconstruct", 1.5, r"share of the budget for reconstruction, in \[0, 1\]; got 1.5"),
    ("train.warmup_steps", -3, r"warmup_steps must be an integer >= 0, got -3"),
    ("train.interval_lr", 0, r"interval_lr must be a finite number > 0"),
])
def test_train_settings_are_checked_where_they_are_built(key, value, expected):
    with pytest.raises(RecipeError, match=expected):
        srbinarize.load_recipe("scales").with_overrides(**{key: value})


def test_recipes_load_from_a_checkout_that_shadows_the_installed_package():
    """From the repository root ``import srbinarize`` is the source tree, which has no ``srbinarize.recipes``
    (the built package maps it from recipes/). ``python -S`` with the checkout and site-packages on the path is
    a non-editable install: no editable finder maps the recipes either."""
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": f"{root}{os.pathsep}{sysconfig.get_paths()['purelib']}", "OMP_NUM_THREADS": "1"}
    code = "import srbinarize; print(srbinarize.__file__, srbinarize.load_recipe('scales').name)"
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(root / "srbinarize" / "__init__.py"), "scales"]
