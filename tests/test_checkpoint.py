"""Converted-model checkpoints: round trip, atomic writes, clear errors, the CLI over them."""

from __future__ import annotations

import pytest
import torch
from conftest import edsr

import srbinarize
from srbinarize.checkpoint import CheckpointError, load_model, save_model
from srbinarize.cli import main
from srbinarize.models.spec import ModelSpec

SPEC = ModelSpec("basicsr.archs.edsr_arch:EDSR", {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 16, "num_block": 2,
                                                   "upscale": 2})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    binary = srbinarize.convert(SPEC.build().eval(), "scales")
    path = save_model(binary, tmp_path_factory.mktemp("ckpt") / "edsr_scales.safetensors", SPEC)
    return binary, path


def test_round_trip_gives_the_same_function(saved):
    binary, path = saved
    again = load_model(path)
    x = torch.rand(1, 3, 17, 23)
    with torch.no_grad():
        torch.testing.assert_close(again(x), binary.eval()(x))
    assert again.srbinarize_info.recipe.layers == binary.srbinarize_info.recipe.layers
    assert not list(path.parent.glob(".*.tmp")), "temporary file left behind"


def test_mismatching_architecture_names_file_and_keys(saved, tmp_path):
    _, path = saved
    wrong = ModelSpec(SPEC.target, {**SPEC.kwargs, "num_block": 3})
    other = save_model(srbinarize.convert(edsr(num_block=3, num_feat=16), "scales"), tmp_path / "three.safetensors",
                       wrong)
    # Graft the 2-block tensors onto the 3-block description: the file no longer fits its architecture.
    from safetensors.torch import load_file

    from srbinarize.checkpoint import atomic_save_tensors, read_metadata

    atomic_save_tensors(load_file(str(path)), other, read_metadata(other))
    with pytest.raises(CheckpointError, match=r"three\.safetensors.*missing.*body\.2\.conv1"):
        load_model(other)


def test_a_file_written_before_a_buffer_existed_still_loads(saved, tmp_path):
    """SCALES' ``fp_gain`` (progressive binarization) came after the first files: without it a file loads with
    the layer's default (1) and computes the same; a weight missing is still refused."""
    from safetensors.torch import load_file

    from srbinarize.checkpoint import atomic_save_tensors, read_metadata

    binary, path = saved
    tensors = load_file(str(path))
    old = {k: v for k, v in tensors.items() if not k.endswith(".fp_gain")}
    assert len(old) < len(tensors)
    older = tmp_path / "older.safetensors"
    atomic_save_tensors(old, older, read_metadata(path))
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(load_model(older)(x), binary(x))
    broken = {k: v for k, v in old.items() if k != "conv_first.weight"}
    atomic_save_tensors(broken, tmp_path / "broken.safetensors", read_metadata(path))
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*1 missing.*conv_first\.weight"):
        load_model(tmp_path / "broken.safetensors")


def test_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*not a readable safetensors"):
        load_model(bad)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an srbinarize model checkpoint"):
        load_model(tmp_path / "plain.safetensors")


def test_cli_inspect_prints_the_table(saved, capsys):
    _, path = saved
    assert main(["inspect", str(path), "--input-size", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "body.0.conv1" in out and "ScalesConv2d" in out and "OPs (BOPs/64 + FLOPs)" in out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A basicsr-style FP checkpoint ({"params": state_dict}) whose architecture must be detected."""
    path = tmp_path_factory.mktemp("fp") / "edsr_x2.pth"
    torch.save({"params": SPEC.build().state_dict()}, path)
    return path


def test_cli_convert_writes_a_reloadable_checkpoint(pretrained, tmp_path, capsys):
    out = tmp_path / "edsr_scales.safetensors"
    assert main(["convert", str(pretrained), "--recipe", "scales", "--set", "spatial_rescale=false", "-o",
                 str(out)]) == 0
    assert "ScalesConv2d" in capsys.readouterr().out
    model = load_model(out)
    assert model.get_submodule("body.0.conv1").spatial is None
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)


def test_cli_unknown_recipe_is_one_clear_line(pretrained, tmp_path, capsys):
    assert main(["convert", str(pretrained), "--recipe", "nosuch", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nosuch'" in err and "Traceback" not in err
    assert not (tmp_path / "x.safetensors").exists()
