"""The `srbinarize` command: one subcommand per verb, each a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UsageError, check_output


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", help="architecture as package.module:Class when it cannot be detected (also allows a "
                   "file to name it)")
    p.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments for --arch")
    p.add_argument("--input-range", type=float, metavar="1|255",
                   help="RGB range a pretrained checkpoint takes (default: detected by probing the model)")


def _load_any(path: str, args: argparse.Namespace):
    """A converted srbinarize checkpoint, or a pretrained FP checkpoint (architecture detected or given)."""
    from .checkpoint import FORMAT, load_model, read_metadata
    from .models.input_range import load_pretrained_in_range

    if path.endswith(".safetensors") and read_metadata(path).get("format") == FORMAT:
        return load_model(path), None
    model, spec, message = load_pretrained_in_range(path, args.input_range, arch=args.arch,
                                                    arch_kwargs=args.arch_kwargs)
    print(message)  # the range given, or the one detected and why
    return model, spec


def _arch_kwargs(text: str) -> str:
    """``--arch-kwargs``, checked to be a JSON object before anything is read or written."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--arch-kwargs {text!r} is not valid JSON ({err}); expected an object like "
                         "'{\"num_feat\": 64}'") from None
    if not isinstance(value, dict):
        raise UsageError(f"--arch-kwargs {text!r} is a JSON {type(value).__name__}; expected an object like "
                         "'{\"num_feat\": 64}'")
    return text


def _input_file(path: str) -> str | Path:
    """A checkpoint argument as a file path (``zoo:NAME`` resolved) for the output checks."""
    from .models.zoo import is_zoo_name, zoo_path

    return zoo_path(path) if is_zoo_name(path) else path


def _cmd_convert(args: argparse.Namespace) -> None:
    from . import convert, summary
    from .checkpoint import save_model
    from .train.cli import key_values

    inputs = {"input checkpoint": _input_file(args.checkpoint)}
    if Path(args.recipe).is_file():
        inputs["recipe"] = args.recipe
    check_output(args.output, inputs, "-o")
    _arch_kwargs(args.arch_kwargs)
    model, spec = _load_any(args.checkpoint, args)
    if spec is None:
        raise UsageError(f"{args.checkpoint} is already converted; give the pretrained FP checkpoint")
    converted = convert(model, args.recipe, **key_values(args.set, "--set"))
    print(summary(converted))
    save_model(converted, args.output, spec)
    print(f"wrote {args.output}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from . import summary

    _arch_kwargs(args.arch_kwargs)
    if min(args.input_size) < 1:
        raise UsageError(f"--input-size {args.input_size[0]} {args.input_size[1]}: expected two positive sizes (H W)")
    model, _ = _load_any(args.model, args)
    if args.sensitivity:
        from .analysis.cli import run_sensitivity

        return run_sensitivity(model, args)
    try:
        table = summary(model, input_size=tuple(args.input_size))
    except RuntimeError as err:  # e.g. a kernel larger than the padded input
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"the model cannot run on a {args.input_size[0]}x{args.input_size[1]} input "
                         f"(--input-size): {first}") from None
    print(table)


def _cmd_export(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .export.onnx import export_onnx

    check_output(args.output, {"input checkpoint": args.checkpoint}, "-o")
    print(export_onnx(load_model(args.checkpoint), args.output, remainder=args.remainder,
                      activations=args.activations))


def _cmd_upscale(args: argparse.Namespace) -> None:
    from .export.upscale import upscale_file

    upscale_file(args.model, args.input, args.output, tile=args.tile, overlap=args.overlap, threads=args.threads,
                 max_pixels=args.max_pixels or None)
    print(f"wrote {args.output}")


def _cmd_recipes(args: argparse.Namespace) -> None:
    from .recipe import builtin_recipes, load_recipe

    for name in builtin_recipes():
        recipe = load_recipe(name)
        print(f"{name:10s} {recipe.about}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="srbinarize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a pretrained FP checkpoint with a recipe")
    p.add_argument("checkpoint")
    p.add_argument("--recipe", default="scales", help="shipped recipe name or path to a .yaml recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe option")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .safetensors")
    _add_model_source(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("inspect", help="print the layer table of a pretrained or converted model")
    p.add_argument("model")
    p.add_argument("--input-size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    _add_model_source(p)
    from .analysis.cli import add_sensitivity_arguments  # --sensitivity and its options

    add_sensitivity_arguments(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="export a converted checkpoint as ONNX with 1-bit srbinarize ops")
    p.add_argument("checkpoint", help="converted .safetensors written by `srbinarize convert` or finetune")
    p.add_argument("-o", "--output", required=True, type=Path, help="output .onnx")
    p.add_argument("--arch", help="allow the checkpoint to name this architecture (package.module:Class) beyond the "
                   "built-in sources")
    p.add_argument("--remainder", choices=("fp32", "int8"), default=None,
                   help="the convs the recipe left FP: FP32 (exact) or int8 QDQ calibrated on the conversion's "
                   "default batch (faster; 0.02-0.07 dB on Set5 x4 for the shared models measured); default: int8 "
                   "where its output on that batch stays within 40 dB PSNR of the FP32 one, else FP32")
    p.add_argument("--activations", choices=("float32", "float16"), default=None,
                   help="tensors between chained binary convs: float16 (less memory traffic; an error where the "
                   "calibration batch exceeds the float16 bound) or float32; default: where this CPU runs the "
                   "fused AVX-512 kernel, float16 where it holds (float32 around larger values), else float32")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("upscale", help="upscale an image with an exported .onnx model (tiled, onnxruntime)")
    p.add_argument("model", type=Path)
    p.add_argument("input", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--tile", type=int, help="tile size in input pixels (0: whole image at once; default: whole up "
                   "to 512 x 512, else tiles of 512)")
    p.add_argument("--overlap", type=int, default=16, help="overlap between tiles in input pixels")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096,
                   help="refuse larger input images (width x height; default 4096 x 4096; 0: no limit)")
    p.set_defaults(func=_cmd_upscale)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=_cmd_recipes)

    from .train.cli import register  # finetune, eval, demo (srbinarize/train/cli.py)

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import SrbinarizeError
    from .models.spec import allow_architectures

    try:
        # --arch is the user's deliberate choice: files read by this command may name that architecture.
        with allow_architectures(getattr(args, "arch", None)):
            return args.func(args) or 0
    except (SrbinarizeError, OSError) as err:  # bad input, or a file that cannot be read or written
        one_line = " ".join(part.strip() for part in str(err).splitlines() if part.strip())  # e.g. YAML's pointers
        print(f"srbinarize {args.command}: error: {one_line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
