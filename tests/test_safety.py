"""Safe by construction: a model file cannot run code, no command writes onto its inputs, bad values are one line."""

from __future__ import annotations

import importlib
import json
import os
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_line_exit_2
from PIL import Image
from safetensors.torch import load_file, save_file

import srbinarize
from srbinarize.checkpoint import CheckpointError, atomic_save_tensors, load_model, read_metadata, save_model
from srbinarize.cli import main
from srbinarize.models import load_pretrained
from srbinarize.models.spec import ModelSpec, ModelSpecError, allow_architectures
from srbinarize.models.zoo import SPEC_KEY, save_fp_model
from srbinarize.recipe import recipe_dir

SPEC = ModelSpec("basicsr.archs.edsr_arch:EDSR", {"num_in_ch": 3, "num_out_ch": 3, "num_feat": 8, "num_block": 1,
                                                   "upscale": 2})


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A real converted checkpoint (SCALES) of a tiny EDSR x2."""
    model = srbinarize.convert(SPEC.build().eval(), "scales")
    return save_model(model, tmp_path_factory.mktemp("conv") / "edsr_scales.safetensors", SPEC)


@pytest.fixture(scope="module")
def fp_file(tmp_path_factory) -> Path:
    """A plain FP safetensors state dict with its spec in the metadata (as the zoo stores them)."""
    path = tmp_path_factory.mktemp("fp") / "edsr_fp.safetensors"
    save_file(SPEC.build().state_dict(), str(path), metadata={SPEC_KEY: SPEC.to_json()})
    return path


# ------------------------------------------------------------------------------ model descriptions are data


class Evil:
    """Files whose metadata names code: ``os:system`` with a command, and a module that acts when imported."""

    def __init__(self, root: Path, converted: Path, fp_file: Path):
        self.marker = root / "PWNED"
        self.root = root
        self.module = f"evil_arch_{uuid.uuid4().hex[:12]}"  # a fresh name: never already in sys.modules
        (root / f"{self.module}.py").write_text(
            "from pathlib import Path\n"
            f"Path({str(root / 'PWNED')!r}).touch()\n"
            "import torch\n"
            "class Net(torch.nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        self.w = torch.nn.Conv2d(3, 3, 3, padding=1)\n"
            "    def forward(self, x):\n"
            "        return torch.nn.functional.interpolate(self.w(x), scale_factor=2)\n"
        )
        self.specs = {
            "system": json.dumps({"target": "os:system", "kwargs": {"command": f"touch {self.marker}"}}),
            "import": json.dumps({"target": f"{self.module}:Net", "kwargs": {}}),
        }
        self.files: dict[tuple[str, str], Path] = {}
        tensors, meta = load_file(str(converted)), read_metadata(converted)
        fp_tensors = load_file(str(fp_file))
        for kind, text in self.specs.items():
            conv = root / f"conv_{kind}.safetensors"
            atomic_save_tensors(tensors, conv, {**meta, "model": text})
            fp = root / f"fp_{kind}.safetensors"
            save_file(fp_tensors, str(fp), metadata={SPEC_KEY: text})
            self.files[("conv", kind)], self.files[("fp", kind)] = conv, fp


@pytest.fixture
def evil(tmp_path, converted, fp_file, monkeypatch) -> Evil:
    monkeypatch.syspath_prepend(str(tmp_path))  # the evil module is importable: only the allow-list stops it
    monkeypatch.chdir(tmp_path)
    return Evil(tmp_path, converted, fp_file)


KINDS = ["system", "import"]


@pytest.mark.parametrize("kind", KINDS)
def test_injected_description_runs_nothing_through_the_api(evil, kind):
    named = "os:system" if kind == "system" else "evil_arch"
    with pytest.raises(CheckpointError, match=rf"names architecture '{named}.*nothing was imported.*--arch"):
        load_model(evil.files[("conv", kind)])
    with pytest.raises(CheckpointError, match="not from an allowed source"):
        load_pretrained(evil.files[("fp", kind)])
    with pytest.raises(ModelSpecError, match="not from an allowed source"):
        ModelSpec.from_json(evil.specs[kind]).build()
    from srbinarize.train.evaluate import entries_for

    for f in (evil.files[("conv", kind)], evil.files[("fp", kind)]):
        with pytest.raises(CheckpointError):
            entries_for(str(f))
    assert not evil.marker.exists()


def test_injected_description_runs_nothing_through_the_cli(evil, capsys):
    out = evil.root / "out"
    for kind in KINDS:
        conv, fp = evil.files[("conv", kind)], evil.files[("fp", kind)]
        calls = [
            ["inspect", str(conv)], ["inspect", str(fp)],
            ["convert", str(fp), "-o", str(out / "c.safetensors")],
            ["convert", str(conv), "-o", str(out / "c.safetensors")],
            ["export", str(conv), "-o", str(out / "m.onnx")],
            ["eval", str(conv), str(fp), "--data", str(evil.root), "--scale", "2"],
            ["finetune", str(fp), "--train", str(evil.root), "--steps", "1", "-o", str(out / "run")],
        ]
        for argv in calls:
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert "not from an allowed source" in err and "Traceback" not in err, (argv, err)
            assert len(err.strip().splitlines()) == 1, err
    assert not evil.marker.exists()
    assert not (out / "c.safetensors").exists() and not (out / "m.onnx").exists()


def test_injected_teacher_in_a_run_folder_runs_nothing_on_resume_or_eval(evil, fp_file, capsys):
    """A run folder from elsewhere: its teacher.safetensors names code; resume and eval refuse it."""
    train = evil.root / "train" / "HR"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(train / f"{i}.png")
    run = evil.root / "run"
    assert main(["finetune", str(fp_file), "--train", str(train.parent), "--steps", "1", "--batch", "2", "--patch",
                 "16", "--workers", "0", "--threads", "1", "--reconstruct", "0", "--quiet", "-o", str(run)]) == 0
    capsys.readouterr()
    atomic_save_tensors(load_file(str(run / "teacher.safetensors")), run / "teacher.safetensors",
                        {**read_metadata(run / "teacher.safetensors"), "model": evil.specs["system"]})
    with pytest.raises(CheckpointError, match="os:system"):
        load_model(run / "teacher.safetensors")
    main(["finetune", "--resume", str(run)])  # a finished run may not load its teacher at all: no code either way
    assert not evil.marker.exists()
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(train.parent), "--scale", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'os:system', which is not from an allowed source" in lines[0], lines
    assert not evil.marker.exists()


def test_only_nn_module_classes_are_called_even_when_allowed(evil):
    spec = ModelSpec.from_json(evil.specs["system"])
    with pytest.raises(ModelSpecError, match=r"'os:system' is a builtin_function_or_method, not an nn.Module class"):
        spec.build(allow=["os:system"])
    with pytest.raises(ModelSpecError, match=r"not an nn\.Module class"):
        ModelSpec("basicsr.archs.edsr_arch:torch", {}).build()  # a module inside an allowed source
    assert not evil.marker.exists()


def test_an_architecture_is_allowed_deliberately(evil, capsys):
    """Named with allow= / --arch, the same class builds; the import then runs, as the user chose."""
    target = f"{evil.module}:Net"
    model = ModelSpec(target).build(allow=[target])
    assert type(model).__name__ == "Net" and evil.marker.exists()
    evil.marker.unlink()
    with allow_architectures(evil.module):  # a whole package
        assert type(ModelSpec(target).build()).__name__ == "Net"
    with pytest.raises(ModelSpecError):
        ModelSpec(target).build()  # the block is over
    fp = evil.files[("fp", "import")]
    torch.manual_seed(0)
    net = importlib.import_module(evil.module).Net

    save_file(net().state_dict(), str(fp), metadata={SPEC_KEY: evil.specs["import"]})
    assert main(["inspect", str(fp), "--arch", target]) == 0
    assert "w" in capsys.readouterr().out


def test_malformed_descriptions_are_one_clear_error(converted, tmp_path):
    tensors, meta = load_file(str(converted)), read_metadata(converted)
    cases = {
        "not json": "{target",
        "a list": "[1, 2]",
        "no target": '{"kwargs": {}}',
        "kwargs a list": '{"target": "basicsr.archs.edsr_arch:EDSR", "kwargs": [1]}',
        "no colon": '{"target": "basicsr.archs.edsr_arch.EDSR"}',
        "relative": '{"target": ".edsr_arch:EDSR"}',
        "bad kwargs": '{"target": "basicsr.archs.edsr_arch:EDSR", "kwargs": {"nope": 1}}',
    }
    for name, text in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        atomic_save_tensors(tensors, path, {**meta, "model": text})
        with pytest.raises(CheckpointError, match=path.name):
            load_model(path)


def test_malicious_pickles_stay_refused(tmp_path, capsys):
    marker = tmp_path / "PICKLED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"params": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_pretrained(tmp_path / "evil.pth")
    assert main(["inspect", str(tmp_path / "evil.pth")]) == 2
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- umask


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(converted, tmp_path, mask):
    old = os.umask(mask)
    try:
        model = load_model(converted)
        ckpt = save_model(model, tmp_path / "m.safetensors", SPEC)
        onnx_path = tmp_path / "m.onnx"
        assert main(["export", str(ckpt), "-o", str(onnx_path)]) == 0
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
        srbinarize.upscale_file(onnx_path, tmp_path / "in.png", tmp_path / "out.png", progress=False)
        fp = save_fp_model(SPEC.build(), SPEC, tmp_path / "fp.safetensors")
    finally:
        os.umask(old)
    for p in (ckpt, onnx_path, tmp_path / "out.png", fp):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, (p, oct(p.stat().st_mode))


# ------------------------------------------------------------------------- no command writes onto its inputs


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}



def test_convert_and_export_never_write_onto_their_input(converted, fp_file, tmp_path, capsys):
    conv, fp = tmp_path / "conv.safetensors", tmp_path / "mine.safetensors"
    conv.write_bytes(converted.read_bytes())
    fp.write_bytes(fp_file.read_bytes())
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.safetensors").symlink_to(conv)
    os.link(fp, tmp_path / "hard.safetensors")
    (tmp_path / "plain.txt").write_text("x")
    before = _tree(tmp_path)
    for command, src in (("export", conv), ("convert", fp)):
        spellings = [src, tmp_path / "sub" / ".." / src.name, Path(os.path.relpath(src))]
        spellings.append(tmp_path / ("link.safetensors" if command == "export" else "hard.safetensors"))
        for out in spellings:
            one_line_exit_2([command, str(src), "-o", str(out)], capsys, f"-o {out}", "is the input checkpoint",
                             "would be overwritten")
        one_line_exit_2([command, str(src), "-o", str(tmp_path / "sub")], capsys, "is an existing folder")
        one_line_exit_2([command, str(src), "-o", str(tmp_path / "plain.txt" / "x.out")], capsys,
                         "plain.txt is a file, not a folder")
    recipe = tmp_path / "sub" / "my.yaml"
    recipe.write_text((recipe_dir() / "scales.yaml").read_text())
    before = _tree(tmp_path)
    one_line_exit_2(["convert", str(fp), "--recipe", str(recipe), "-o", str(recipe)], capsys, "is the recipe")
    assert _tree(tmp_path) == before  # nothing changed, nothing left behind


@pytest.mark.parametrize("value", ["[1, 2]", "{num_feat: 8", '"text"', "3"])
def test_arch_kwargs_must_be_a_json_object(fp_file, tmp_path, capsys, value):
    for argv in (["convert", str(fp_file), "-o", str(tmp_path / "c.safetensors"), "--arch-kwargs", value],
                 ["inspect", str(fp_file), "--arch-kwargs", value]):
        one_line_exit_2(argv, capsys, "--arch-kwargs", value, "expected an object")
    assert not list(tmp_path.iterdir())


def test_a_description_of_a_huge_model_is_refused_before_building(converted, tmp_path):
    """A few bytes of metadata must not exhaust memory: sizes are checked (on the meta device) first."""
    tensors, meta = load_file(str(converted)), read_metadata(converted)
    huge = {"target": SPEC.target, "kwargs": {**SPEC.kwargs, "num_feat": 60000}}  # 32 G parameters
    absurd = {"target": SPEC.target, "kwargs": {**SPEC.kwargs, "num_block": 10**9}}
    for name, spec, message in (("huge", huge, r"would hold [\d,]+ parameters, above"),
                                ("absurd", absurd, r"num_block=1000000000 is above 65536")):
        path = tmp_path / f"{name}.safetensors"
        atomic_save_tensors(tensors, path, {**meta, "model": json.dumps(spec)})
        with pytest.raises(CheckpointError, match=rf"{name}\.safetensors.*{message}"):
            load_model(path)


def test_other_bad_command_line_values_are_one_line(converted, tmp_path, capsys):
    for size in (["0", "0"], ["-1", "5"]):
        one_line_exit_2(["inspect", str(converted), "--input-size", *size], capsys, "--input-size",
                         "expected two positive sizes")
    if Path("/proc/self").is_dir():  # a folder no one can create files in, even root
        one_line_exit_2(["export", str(converted), "-o", "/proc/m.onnx"], capsys,
                         "/proc/m.onnx: cannot write in /proc")
    assert not list(tmp_path.iterdir())
