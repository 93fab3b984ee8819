"""Recipes are data: loading, validation errors that name the file and key, overrides."""

from __future__ import annotations

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
