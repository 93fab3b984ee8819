"""Compile the onnxruntime custom-op library (libsrbinarize_ort.so).

Used by setup.py (pip install) and by kernels/build_sanitized.sh. Every source is compiled with
generic x86-64 flags except the AVX2 / AVX-512 kernel files, which get their own -m flags; the
library picks one of them at run time (kernels/src/dispatch.cc), so it runs on any x86-64 CPU.

    python kernels/build.py -o OUT.so [--include DIR] [--sanitize]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
DEFAULT_INCLUDE = HERE.parent / "build" / "ort-headers" / "include"
FETCH_HINT = "bash kernels/fetch_ort_headers.sh"

SOURCES = {
    "ops.cc": [],
    "dispatch.cc": [],
    "kernel_scalar.cc": [],
    "kernel_avx2.cc": ["-mavx2", "-mpopcnt"],
    "kernel_avx512.cc": ["-mavx2", "-mpopcnt", "-mavx512f", "-mavx512vpopcntdq"],
}
COMMON = ["-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wextra"]
SANITIZE = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]


def find_include(include: str | os.PathLike | None = None) -> Path:
    """The directory holding onnxruntime_c_api.h: the argument, $ORT_INCLUDE_DIR or build/ort-headers."""
    candidates = [include, os.environ.get("ORT_INCLUDE_DIR"), DEFAULT_INCLUDE]
    for c in candidates:
        if c and (Path(c) / "onnxruntime_cxx_api.h").is_file():
            return Path(c)
    raise SystemExit(
        "srbinarize: the onnxruntime C/C++ API headers (onnxruntime_cxx_api.h) were not found in "
        f"{DEFAULT_INCLUDE} or $ORT_INCLUDE_DIR.\nFetch them (Debian trixie's libonnxruntime-dev) with:\n"
        f"    {FETCH_HINT}\nthen install again."
    )


def build(
    output: str | os.PathLike,
    include: str | os.PathLike | None = None,
    sanitize: bool = False,
    emulate_avx512: bool = False,
    src: str | os.PathLike = SRC,
) -> Path:
    """Compile and link the library to `output`; returns its path.

    emulate_avx512 (tests only): the AVX-512 kernels with their intrinsics emulated in plain C++
    (kernels/testing/avx512_emulation.h) and offered wherever AVX2 runs. src: the sources' directory
    (another revision's, for benchmarks/kernel_ab.py).
    """
    include = find_include(include)
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise SystemExit(f"srbinarize: C++ compiler '{cxx}' not found (install g++ or set CXX)")
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    flags = COMMON + (SANITIZE if sanitize else []) + [f"-I{include}"]
    sources = dict(SOURCES)
    if emulate_avx512:
        sources["kernel_avx512.cc"] = ["-mavx2", "-mpopcnt", "-include", str(HERE / "testing" / "avx512_emulation.h")]
        sources["dispatch.cc"] = ["-DSRB_EMULATED_AVX512"]
    with tempfile.TemporaryDirectory() as tmp:

        def compile_one(item):
            name, extra = item
            obj = Path(tmp) / (name + ".o")
            cmd = [cxx, *flags, *extra, "-c", str(Path(src) / name), "-o", str(obj)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"srbinarize: compiling {name} failed:\n{' '.join(cmd)}\n{run.stderr}")
            sys.stderr.write(run.stderr)  # warnings
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = list(pool.map(compile_one, sources.items()))
        link = [cxx, *flags, "-shared", *map(str, objects), "-o", str(output)]
        run = subprocess.run(link, capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"srbinarize: linking failed:\n{' '.join(link)}\n{run.stderr}")
    return output


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--include", help="onnxruntime headers directory")
    parser.add_argument("--sanitize", action="store_true", help="AddressSanitizer + UBSan build")
    parser.add_argument("--emulate-avx512", action="store_true", help="tests: AVX-512 kernels in emulation")
    args = parser.parse_args(argv)
    print(build(args.output, args.include, args.sanitize, args.emulate_avx512))


if __name__ == "__main__":
    sys.exit(main())
