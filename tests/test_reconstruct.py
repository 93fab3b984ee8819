"""Block-wise reconstruction against the FP teacher: units from the graph, isolation, improvement."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import edsr, rcan

import srbinarize
from srbinarize.train.phases.reconstruction import phase_units
from srbinarize.train.reconstruct import (
    _examples,
    reconstruct_unit,
    reconstruction_units,
    student_output,
    teacher_output,
)


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(2, 3, 16, 16, generator=g) for _ in range(n)]


def test_units_are_blocks_in_dataflow_order():
    units = reconstruction_units(srbinarize.convert(edsr(num_block=3)))
    assert [u.path for u in units] == ["body.0", "body.1", "body.2", "conv_after_body"]
    assert units[0].layers == ("body.0.conv1", "body.0.conv2")
    rcan_units = reconstruction_units(srbinarize.convert(rcan()))
    assert [u.path for u in rcan_units] == ["body.0", "body.1", "conv_after_body"]


class Wrapped(torch.nn.Module):
    """Every layer inside one module (as team03_fmen's ``model``): the body is a single unit."""

    def __init__(self):
        super().__init__()
        self.model = edsr(num_block=2)

    def forward(self, x):
        return self.model(x)


def test_a_body_in_one_unit_is_not_reconstructed():
    student = srbinarize.convert(Wrapped())
    assert [u.path for u in reconstruction_units(student)] == ["model"]
    assert phase_units(student) == []
    assert [u.path for u in phase_units(srbinarize.convert(edsr(num_block=2)))] == ["body.0", "body.1",
                                                                                    "conv_after_body"]


def test_student_and_teacher_unit_outputs_agree_when_nothing_is_binarized():
    fp = edsr(num_block=2).eval()
    same = srbinarize.convert(fp, binarize_weights=False, binarize_activations=False, spatial_rescale=False,
                              channel_rescale=False)
    x = torch.rand(1, 3, 12, 12)
    for unit in reconstruction_units(same):
        with torch.no_grad():
            torch.testing.assert_close(student_output(same, unit, x), teacher_output(fp, unit, x))


def swinir() -> torch.nn.Module:
    from basicsr.archs.swinir_arch import SwinIR

    return SwinIR(upscale=2, img_size=16, window_size=4, img_range=1.0, depths=[2, 2], embed_dim=24,
                  num_heads=[2, 2], mlp_ratio=2, upsampler="pixelshuffle")


def test_swinir_units_are_its_residual_groups():
    units = reconstruction_units(srbinarize.convert(swinir().eval()))
    assert [u.path for u in units] == ["layers.0", "layers.1", "conv_after_body"]
    assert len(units[0].layers) == 9  # 2 blocks x (qkv, proj, fc1, fc2) + the group's closing conv


@pytest.mark.parametrize(("build", "index"), [(lambda: edsr(num_block=2), 1), (swinir, 0)], ids=["edsr", "swinir"])
def test_one_unit_changes_only_itself_and_never_the_teacher(build, index):
    torch.manual_seed(0)
    teacher = build().eval()
    teacher_before = copy.deepcopy(teacher.state_dict())
    student = srbinarize.convert(teacher)
    unit = reconstruction_units(student)[index]
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = _batches(1, seed=1)[0]
    with torch.no_grad():
        err_before = (student_output(student, unit, x) - teacher_output(teacher, unit, x)).pow(2).mean()
    result = reconstruct_unit(student, teacher, unit, _batches(2), steps=12, lr=2e-3)
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "the unit did not train"
    assert all(unit.owns(k) for k in changed), f"outside the unit: {sorted(k for k in changed if not unit.owns(k))}"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher changed: {k}"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters() if p.dtype.is_floating_point), "left frozen"
    with torch.no_grad():
        err_after = (student_output(student, unit, x) - teacher_output(teacher, unit, x)).pow(2).mean()
    assert err_after < err_before and result.last_loss < result.first_loss


def test_chained_unit_inputs_equal_those_of_a_full_pass():
    torch.manual_seed(0)
    teacher = edsr(num_block=3).eval()
    student = srbinarize.convert(teacher)
    first, second = reconstruction_units(student)[:2]
    pool = _batches(2)
    done = reconstruct_unit(student, teacher, first, pool, steps=3, lr=2e-3)
    chained = _examples(student, teacher, second, pool, 1024, previous=done)
    direct = _examples(student, teacher, second, pool, 1024, previous=None)
    for (a_in, a_out), (b_in, b_out) in zip(chained, direct, strict=True):
        torch.testing.assert_close(a_in, b_in)
        torch.testing.assert_close(a_out, b_out)


@pytest.mark.parametrize("recipe", ["scales", "bam", "ma", "lmb", "fqsr"])
def test_every_recipe_reconstructs_through_the_same_units(recipe):
    torch.manual_seed(0)
    teacher = edsr(num_block=2).eval()
    student = srbinarize.convert(teacher, recipe, calibration_data=torch.rand(4, 3, 16, 16))
    units = reconstruction_units(student)
    assert [u.path for u in units][:2] == ["body.0", "body.1"]
    for unit in units[:2]:
        result = reconstruct_unit(student, teacher, unit, _batches(1), steps=15, lr=2e-3)
        assert result.last_loss < result.first_loss, (recipe, unit.path, result)
