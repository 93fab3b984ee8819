"""A finetune run folder is safe: every setting is checked before anything is written, a budget cannot starve a
phase, resume survives a damaged checkpoint and never erases a finished run, a kill loses no log line or
baseline row, files honour the umask, and a folder of the earlier format is refused with one message."""

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
from PIL import Image

from srbinarize.cli import main
from srbinarize.errors import UsageError
from srbinarize.models.spec import ModelSpec
from srbinarize.models.zoo import save_fp_model
from srbinarize.train.checkpoints import list_checkpoints
from srbinarize.train.cli import key_values
from srbinarize.train.config import Budget, DataConfig, FinetuneError, RunSettings
from srbinarize.train.finetune import finetune

TINY = {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 2, "upscale": 2}  # 3 reconstruction units


def _images(folder: Path, n: int, size: int, seed: int) -> Path:
    """Smooth random RGB images (a few octaves of upsampled noise), as PNG under ``folder/HR``."""
    rng = np.random.default_rng(seed)
    (folder / "HR").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.random((size // 8, size // 8, 3)).astype(np.float32)
        img = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC))
        Image.fromarray(img).save(folder / "HR" / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    torch.manual_seed(0)
    spec = ModelSpec("basicsr.archs.edsr_arch:EDSR", TINY)
    model = save_fp_model(spec.build(), spec, root / "tiny_x2.safetensors", dtype=torch.float32)
    return {"root": root, "model": str(model), "train": _images(root / "train", 3, 96, 0),
            "val": _images(root / "val", 1, 48, 1)}


def _run(tiny, out: Path, steps: int = 6, save_every: int = 500, limit: int | None = None, **train):
    data = DataConfig(train=tiny["train"], val=tiny["val"], batch=2, patch=16, workers=0)
    run = RunSettings(out=str(out), threads=1, save_every=save_every, save_seconds=1e9)
    return finetune(tiny["model"], "scales", data, Budget(steps=steps), run, progress=False,
                    max_steps_this_call=limit, **{"reconstruct": 0.0, **train})


def _cli_args(tiny, out: Path, *extra: str) -> list[str]:
    return ["finetune", tiny["model"], "--train", str(tiny["train"]), "--val", str(tiny["val"]), "--batch", "2",
            "--patch", "16", "--workers", "0", "--threads", "1", "--quiet", "-o", str(out), *extra]


def _losses(run: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.mark.parametrize(("flags", "expected"), [
    (["--minutes", "nan"], "minutes must be a finite number > 0, got nan"),
    (["--minutes", "-1"], "minutes must be a finite number > 0, got -1.0"),
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--steps", "2", "--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["--steps", "2", "--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--steps", "2", "--weight-decay", "-1"], "weight_decay must be a finite number >= 0, got -1.0"),
    (["--steps", "2", "--save-every", "0"], "save_every must be an integer >= 1, got 0"),
    (["--steps", "2", "--device", "tpu"], "device 'tpu' is unknown: expected cpu or cuda"),
    (["--steps", "2", "--l1-weight", "nan"], "l1_weight must be a finite number >= 0, got nan"),
    (["--steps", "2", "--set", "train.lr=-1"], "lr must be a finite number > 0, got -1.0"),
    (["--steps", "2", "--set", "train.optimizer=adamx"], "optimizer 'adamx' is unknown; expected one of"),
])
def test_every_bad_setting_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, flags, expected):
    out = tmp_path / "run"
    assert main(_cli_args(tiny, out, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused(tiny, tmp_path, capsys):
    assert main(_cli_args(tiny, tmp_path / "run", "--steps", "2", "--device", "cuda")) == 2
    assert "torch sees no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_convert_refuses_a_bad_train_setting(tiny, tmp_path, capsys):
    out = tmp_path / "converted.safetensors"
    assert main(["convert", tiny["model"], "--set", "train.optimizer=adamx", "-o", str(out)]) == 2
    assert "optimizer 'adamx' is unknown" in capsys.readouterr().err
    assert not out.exists()


def test_output_must_be_new_or_empty(tiny, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert main(_cli_args(tiny, a_file, "--steps", "2")) == 2
    assert "is an existing file" in capsys.readouterr().err and a_file.read_text() == "mine"
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "best.safetensors").write_text("not ours")
    assert main(_cli_args(tiny, busy, "--steps", "2")) == 2
    assert "already holds files but no run" in capsys.readouterr().err
    assert sorted(p.name for p in busy.iterdir()) == ["best.safetensors"]
    assert (busy / "best.safetensors").read_text() == "not ours"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(tiny, empty, steps=1).step == 1


def test_a_steps_budget_too_small_for_both_phases_says_so(tiny, tmp_path, capsys):
    # reconstruct 0.5: 3 units take at least 3 steps, so 3 steps leave no end-to-end step
    assert main(_cli_args(tiny, tmp_path / "run", "--steps", "3", "--reconstruct", "0.5")) == 2
    err = capsys.readouterr().err
    assert "too small for reconstruct 0.5" in err and "at least 4 steps" in err, err
    assert not (tmp_path / "run").exists()
    result = _run(tiny, tmp_path / "four", steps=4, reconstruct=0.5)
    assert result.total_steps == 1 and result.step == 1


def test_resume_falls_back_to_the_newest_intact_checkpoint_and_keeps_a_finished_summary(tiny, tmp_path):
    full = _run(tiny, tmp_path / "full", steps=6, save_every=2)
    part = _run(tiny, tmp_path / "part", steps=6, save_every=2, limit=4)
    assert part.interrupted and [s for s, _ in list_checkpoints(part.run_dir)] == [2, 4]
    damaged = list_checkpoints(part.run_dir)[-1][1] / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # truncated
    resumed = finetune(resume=part.run_dir, progress=False)
    assert resumed.step == 6 and not resumed.interrupted
    assert "is damaged" in (part.run_dir / "train.log").read_text()
    assert _losses(part.run_dir) == _losses(full.run_dir)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = (part.run_dir / "summary.json").read_bytes()
    again = finetune(resume=part.run_dir, progress=False)
    assert (part.run_dir / "summary.json").read_bytes() == summary  # a finished run is left as it is
    assert again.final_val == resumed.final_val and again.final_val, again.final_val
    umask = os.umask(0)
    os.umask(umask)
    for path in part.run_dir.rglob("*"):
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == expected, f"{path}: {oct(path.stat().st_mode & 0o777)}"


def _spawn(tiny, out: Path) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).with_name("srbinarize")),
           *_cli_args(tiny, out, "--steps", "600", "--reconstruct", "0.9", "--save-every", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 400) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the run did not get there in time"
        time.sleep(0.01)  # polls leave the 2 cores to the run
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()


def _units_seen(run: Path) -> set[str]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return set()
    units = set()
    for line in metrics.read_text().splitlines():
        try:
            units.add(json.loads(line).get("unit"))
        except json.JSONDecodeError:
            continue
    return units


def test_a_kill_loses_neither_unit_lines_nor_the_reconstructed_row(tiny, tmp_path):
    mid = tmp_path / "mid"
    _kill_when(_spawn(tiny, mid), lambda: "body.1" in _units_seen(mid))  # killed inside the second unit
    assert "reconstruction body.0: relative MSE" in (mid / "train.log").read_text()
    after = tmp_path / "after"
    _kill_when(_spawn(tiny, after), lambda: (after / "reconstructed.safetensors").exists())
    stored = json.loads((after / "baselines.json").read_text())["baselines"]
    assert "reconstructed" in stored["val"], stored
    resumed = finetune(resume=after, progress=False, max_steps_this_call=1)
    assert resumed.baselines["val"]["reconstructed"] == stored["val"]["reconstructed"]


def test_a_run_folder_of_the_earlier_format_is_refused(tiny, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    flat = {"model": tiny["model"], "recipe": {"name": "scales"}, "train": [str(tiny["train"])], "val": [],
            "scale": 2, "steps": 6, "minutes": None, "batch": 2, "patch": 16, "lr": 1e-3, "total_steps": 6}
    (old / "config.json").write_text(json.dumps(flat))
    before = sorted(p.name for p in old.iterdir())
    with pytest.raises(FinetuneError, match=r"earlier run format .*start a new run"):
        finetune(resume=old, progress=False)
    assert main(["finetune", "--resume", str(old), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "earlier run format" in err and "\n" not in err
    assert sorted(p.name for p in old.iterdir()) == before


def test_run_config_is_one_file_that_reads_back_the_same(tmp_path):
    from srbinarize.recipe import load_recipe
    from srbinarize.train.config import ModelConfig, RunConfig

    cfg = RunConfig(ModelConfig("zoo:edsr-x2", scale=2), load_recipe("fqsr").with_overrides(**{"train.lr": 5e-4}),
                    DataConfig(train=[str(tmp_path / "a"), str(tmp_path / "b")], val=str(tmp_path / "v"), batch=4),
                    Budget(minutes=1.5), RunSettings(out=str(tmp_path), seed=3, device="cpu"),
                    {"end_to_end": {"steps": 7, "warmup_steps": 1}})
    cfg.save(tmp_path)
    again = RunConfig.load(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.recipe.train.lr == 5e-4 and again.data.train == cfg.data.train and again.budget.minutes == 1.5
    stored = json.loads((tmp_path / "config.json").read_text())
    assert set(stored) == {"format", "model", "recipe", "data", "budget", "run", "plan"}
    assert "lr" in stored["recipe"]["train"] and not any("lr" in stored[k] for k in ("data", "budget", "run"))


def test_an_unknown_training_setting_is_named(tiny, tmp_path):
    with pytest.raises(FinetuneError, match=r"unknown training setting\(s\) \['lrr'\]"):
        _run(tiny, tmp_path / "run", lrr=1e-3)
    assert not (tmp_path / "run").exists()


def test_a_time_budget_used_up_by_reconstruction_is_said_and_validated(tiny, tmp_path):
    data = DataConfig(train=tiny["train"], val=tiny["val"], batch=2, patch=16, workers=0)
    run = RunSettings(out=str(tmp_path / "run"), threads=1)
    result = finetune(tiny["model"], "scales", data, Budget(minutes=0.005), run, progress=False, reconstruct=0.5)
    # Either reconstruction ran out the clock (and the log says end-to-end got nothing), or end-to-end still got
    # its minimum share: never zero end-to-end steps in silence. Which one depends on the machine's speed.
    said = "no time was left for end-to-end training" in (tmp_path / "run" / "train.log").read_text()
    assert said or result.step >= 1
    assert result.final_val["val"]["psnr"] > 0 and (tmp_path / "run" / "crops.png").is_file()
    assert (tmp_path / "run" / "final.safetensors").is_file() and not result.interrupted


def test_set_values_read_as_yaml_with_exponent_numbers_as_numbers():
    values = key_values(["train.lr=1e-3", "a=2E+2", "b=0.5", "c=clipped", "d=[x, y]", "e=1e"], "--set")
    assert values == {"train.lr": 1e-3, "a": 200.0, "b": 0.5, "c": "clipped", "d": ["x", "y"], "e": "1e"}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        key_values(["lr"], "--set")
