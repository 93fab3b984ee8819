"""The finetune loop: it learns, resumes bit for bit (also after SIGKILL), saves on Ctrl-C, explains bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA
from PIL import Image

from srbinarize.checkpoint import load_model
from srbinarize.models.spec import ModelSpec
from srbinarize.models.zoo import save_fp_model
from srbinarize.recipe import load_recipe
from srbinarize.train.checkpoints import list_checkpoints, read_extra
from srbinarize.train.config import Budget, DataConfig, RunSettings
from srbinarize.train.data import DataError
from srbinarize.train.finetune import FinetuneError, finetune
from srbinarize.train.losses import LossError

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not (DATA / "BSD100").is_dir(), reason="../shared/data not present")
TINY = {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 2, "upscale": 2}


def _crops(src: Path, dest: Path, n: int, size: int = 96) -> Path:
    (dest / "HR").mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.png"))[:n]:
        img = np.asarray(Image.open(p).convert("RGB"))
        h, w = img.shape[:2]
        Image.fromarray(img[(h - size) // 2 : (h + size) // 2, (w - size) // 2 : (w + size) // 2]).save(
            dest / "HR" / p.name)
    return dest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Small crops of BSD100 (train) and Set5 (val) and a tiny EDSR x2 checkpoint."""
    if not (DATA / "BSD100").is_dir():
        pytest.skip("../shared/data not present")
    root = tmp_path_factory.mktemp("finetune")
    train = _crops(DATA / "BSD100" / "HR", root / "train", 6)
    val = _crops(DATA / "Set5" / "HR", root / "val", 2, 64)
    torch.manual_seed(0)
    spec = ModelSpec("basicsr.archs.edsr_arch:EDSR", TINY)
    model = save_fp_model(spec.build(), spec, root / "tiny_x2.safetensors", dtype=torch.float32)
    return {"root": root, "train": train, "val": val, "model": model}


def _finetune(setup, out: Path, recipe="scales", *, steps=None, minutes=None, train=None, patch=16, val_every=None,
              save_every=500, max_steps_this_call=None, reconstruct=0.0, **train_overrides):
    """A small run on the setup's data; end-to-end only unless a test asks for reconstruction."""
    data = DataConfig(train=train or setup["train"], val=setup["val"], batch=4, patch=patch, workers=0)
    run = RunSettings(out=str(out), threads=1, save_seconds=1e9, val_every=val_every, save_every=save_every)
    return finetune(str(setup["model"]), recipe, data, Budget(steps=steps, minutes=minutes), run, progress=False,
                    max_steps_this_call=max_steps_this_call, reconstruct=reconstruct, **train_overrides)


def _losses(run: Path) -> list[tuple[int, float]]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append((rec["step"], rec["loss"]))
    return out


def test_finetuning_learns_and_writes_the_run_folder(setup):
    run = setup["root"] / "learns"
    result = _finetune(setup, run, steps=40, lr=3e-3, val_every=20)
    converted = result.baselines["val"]["converted"]
    assert result.step == 40 and not result.interrupted
    assert result.final_val["val"]["psnr"] > converted + 1.0, (converted, result.final_val)
    for name in ("config.json", "train.log", "metrics.jsonl", "curves.png", "crops.png", "summary.json",
                 "teacher.safetensors", "converted.safetensors", "best.safetensors", "final.safetensors"):
        assert (run / name).is_file(), name
    steps = [s for s, _ in _losses(run)]
    assert steps == list(range(1, 41))
    assert "l1" in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    best = load_model(run / "best.safetensors")
    assert sum(p.numel() for p in best.parameters()) == sum(p.numel() for p in result.model.parameters())
    assert Image.open(run / "crops.png").width > 4 * 96


@pytest.mark.parametrize("recipe", ["scales", "fqsr"])  # fqsr: one optimizer group per quantizer interval
def test_resume_continues_bit_for_bit(setup, recipe):
    kw = dict(steps=8, val_every=4, save_every=3)
    full = _finetune(setup, setup["root"] / f"full_{recipe}", recipe, **kw)
    part = _finetune(setup, setup["root"] / f"part_{recipe}", recipe, max_steps_this_call=5, **kw)
    assert part.interrupted and part.step == 5
    resumed = finetune(resume=setup["root"] / f"part_{recipe}", progress=False)
    assert resumed.step == 8
    assert _losses(setup["root"] / f"part_{recipe}") == _losses(setup["root"] / f"full_{recipe}")
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(*args: str) -> list[str]:
    # The installed command: `python -m` from the checkout would import the source tree instead.
    return [str(Path(sys.executable).with_name("srbinarize")), *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _finetune_args(setup, run: Path, steps: int) -> list[str]:
    return ["finetune", str(setup["model"]), "--train", str(setup["train"]), "--val", str(setup["val"]),
            "--steps", str(steps), "--batch", "4", "--patch", "16", "--workers", "2", "--threads", "1",
            "--save-every", "1", "--val-every", "1000", "--reconstruct", "0", "--quiet", "-o", str(run)]


def _wait_for_steps(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run / "metrics.jsonl").is_file() and len(_losses_lenient(run)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {n} steps after {timeout} s")


def _losses_lenient(run: Path) -> list:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out.append(rec)
    return out


def test_sigkill_mid_run_then_resume_joins_the_uninterrupted_curve(setup):
    steps = 14
    reference = setup["root"] / "ref_cli"
    subprocess.run(_cli(*_finetune_args(setup, reference, steps)), check=True, env=_env(), cwd=ROOT,
                   capture_output=True)
    killed = setup["root"] / "killed"
    proc = subprocess.Popen(_cli(*_finetune_args(setup, killed, steps)), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_steps(killed, 6, proc)
    os.kill(proc.pid, signal.SIGKILL)  # checkpoints are written every step: likely mid-write
    proc.communicate()
    done = list_checkpoints(killed)
    assert done and done[-1][0] < steps
    for _, path in done:  # every checkpoint folder that exists is complete and loads
        load_model(path / "model.safetensors")
    r = subprocess.run(_cli("finetune", "--resume", str(killed), "--quiet"), env=_env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _losses(killed) == _losses(reference)
    a = load_model(reference / "final.safetensors").state_dict()
    b = load_model(killed / "final.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.startswith(".tmp") for p in (killed / "checkpoints").iterdir())


def test_ctrl_c_saves_and_exits_cleanly(setup):
    run = setup["root"] / "ctrl_c"
    proc = subprocess.Popen(_cli(*_finetune_args(setup, run, 10_000)), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_steps(run, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--resume" in out
    step = list_checkpoints(run)[-1][0]
    assert step == len(_losses(run))  # the checkpoint holds every step that was logged


def test_feature_distillation_and_recipe_extra_losses(setup):
    run = setup["root"] / "extras"
    recipe = load_recipe("fqsr").with_overrides(**{"train.extra_losses": {"sqcl": 0.3}})
    _finetune(setup, run, recipe, steps=2, feature_distill_weight=0.5)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"l1", "distill", "feature", "sqcl"} <= set(first), first  # sqcl: declared by the recipe override
    with pytest.raises(LossError, match="unknown extra loss 'nope'"):
        _finetune(setup, setup["root"] / "bad_loss", steps=1, extra_losses={"nope": 1.0})


def test_distillation_off_needs_no_teacher_forward(setup):
    run = setup["root"] / "no_distill"
    _finetune(setup, run, steps=2, distill_weight=0.0)
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert "distill" not in first and "l1" in first


def test_bad_input_gives_clear_messages(setup, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        _finetune(setup, tmp_path / "a", steps=1, train=empty)
    with pytest.raises(DataError, match="smaller than the HR patch"):
        _finetune(setup, tmp_path / "b", steps=1, patch=64)
    with pytest.raises(FinetuneError, match=r"share of the budget for reconstruction, in \[0, 1\]"):
        _finetune(setup, tmp_path / "f", steps=1, reconstruct=1.5)
    with pytest.raises(FinetuneError, match="exactly one budget"):
        _finetune(setup, tmp_path / "c")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text("{}")
    with pytest.raises(FinetuneError, match="already holds a run"):
        _finetune(setup, tmp_path / "e", steps=1)
    r = subprocess.run(_cli("finetune", str(setup["model"]), "--scale", "4", "--train", str(setup["train"]),
                            "--steps", "1", "-o", str(tmp_path / "d")), env=_env(), cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "is a x2 model" in r.stderr and "--scale 4" in r.stderr
    assert "Traceback" not in r.stderr


def test_eval_prints_the_table_for_a_run(setup):
    run = setup["root"] / "learns"
    if not (run / "final.safetensors").is_file():
        pytest.skip("needs test_finetuning_learns_and_writes_the_run_folder")
    r = subprocess.run(_cli("eval", str(run), "--data", str(setup["val"])), env=_env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for row in ("| bicubic |", "| FP teacher |", "| converted (no finetune) |", "| finetuned (final, step 40) |"):
        assert row in r.stdout, r.stdout
    assert "PSNR / SSIM" in r.stdout


@needs_data
def test_minutes_budget_is_kept(setup):
    run = setup["root"] / "minutes"
    t0 = time.time()
    result = _finetune(setup, run, minutes=0.25)
    assert time.time() - t0 < 0.25 * 60 + 20
    assert result.total_steps >= 5 and (run / "final.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["plan"]["end_to_end"]["steps"] == result.total_steps


def test_demo_runs_the_whole_pipeline(setup, tmp_path):
    from srbinarize.models import zoo_names
    from srbinarize.train.cli import run_demo, skimage_folders

    if "edsr-x2" not in zoo_names():
        pytest.skip("zoo model not built")
    data = tmp_path / "data"
    _crops(DATA / "BSD100" / "HR", data / "BSD100", 6)
    _crops(DATA / "Set5" / "HR", data / "Set5", 2, 64)
    _crops(DATA / "Set14" / "HR", data / "Set14", 2, 64)
    report = run_demo(0.15, tmp_path / "demo", data=data, progress=False, batch=4, patch=16)
    for row in ("| bicubic |", "| FP teacher |", "| converted (no finetune) |", "| finetuned (final, step"):
        assert row in report, report
    assert "Set5 x2" in report and "Set14 x2" in report
    assert (tmp_path / "demo" / "report.md").read_text() == report
    assert (tmp_path / "demo" / "crops.png").is_file() and (tmp_path / "demo" / "curves.png").is_file()
    train, evaluation = skimage_folders(tmp_path / "photos")  # the fallback without ../shared/data
    assert len(list((train / "HR").glob("*.png"))) == 8 and len(list((evaluation / "HR").glob("*.png"))) == 3


def _unit_losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["recon_step"], r["unit_loss"]) for r in records if r.get("phase") == "reconstruction"]


def test_reconstruction_phase_resumes_from_the_unit_it_was_on(setup):
    # tiny EDSR: 3 units (body.0, body.1, conv_after_body); 0.5 x 12 steps -> 2 steps per unit, then 6 end-to-end
    kw = dict(steps=12, val_every=100, save_every=100, reconstruct=0.5)
    full = _finetune(setup, setup["root"] / "recon_full", **kw)
    assert full.total_steps == 6 and [s for s, _ in _unit_losses(full.run_dir)] == list(range(1, 7))
    assert "reconstructed" in full.baselines["val"] and (full.run_dir / "reconstructed.safetensors").is_file()
    part = _finetune(setup, setup["root"] / "recon_part", max_steps_this_call=3, **kw)
    assert part.interrupted and not (part.run_dir / "reconstructed.safetensors").exists()
    [(_, ckpt)] = list_checkpoints(part.run_dir / "reconstruction")[-1:]
    assert read_extra(ckpt)[1] == {"unit": 1, "unit_path": "body.1", "unit_step": 1}
    resumed = finetune(resume=part.run_dir, progress=False)
    assert resumed.step == 6 and not resumed.interrupted
    assert _unit_losses(part.run_dir) == _unit_losses(full.run_dir)
    assert _losses(part.run_dir) == _losses(full.run_dir)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
