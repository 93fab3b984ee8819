"""onnxruntime integration: the compiled custom-op library of the ``srbinarize`` ONNX domain.

``libsrbinarize_ort.so`` (built from ``kernels/`` by ``pip install``) implements ``BinaryConv2d`` and
``BinaryLinear`` with AVX-512 VPOPCNTDQ, AVX2 or scalar kernels chosen at run time. Set
``SRBINARIZE_KERNEL=avx512|avx2|scalar`` before creating a session to force a path (an unsupported one
makes session creation fail with a clear error); unset or ``auto`` takes the best the CPU supports.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from srbinarize.errors import SrbinarizeError
from srbinarize.runtime.packing import pack_conv_weight, pack_linear_weight

__all__ = [
    "DOMAIN",
    "KERNEL_ENV",
    "KERNEL_PATHS",
    "LIBRARY_ENV",
    "cpu_has_vnni",
    "kernel_path",
    "kernel_supported",
    "library_path",
    "ort_session",
    "pack_conv_weight",
    "pack_linear_weight",
]

DOMAIN = "srbinarize"
KERNEL_ENV = "SRBINARIZE_KERNEL"
KERNEL_PATHS = ("avx512", "avx2", "scalar")
LIBRARY_ENV = "SRBINARIZE_ORT_LIBRARY"  # use another build of the library (e.g. the sanitized one)
_LIBRARY_NAME = "libsrbinarize_ort.so"


def cpu_has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI or AVX-VNNI (Linux /proc/cpuinfo; False where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_vnni" in flags or "avx_vnni" in flags


def library_path() -> Path:
    """Path of the custom-op library ($SRBINARIZE_ORT_LIBRARY, else the one installed in this package)."""
    path = Path(os.environ.get(LIBRARY_ENV) or Path(__file__).with_name(_LIBRARY_NAME))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the srbinarize kernel library is built by `pip install .` (or `pip install -e .`)"
            " after `bash kernels/fetch_ort_headers.sh`"
        )
    return path


@functools.cache
def _library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.srbinarize_kernel_path.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.srbinarize_kernel_path.restype = ctypes.c_int
    lib.srbinarize_kernel_supported.argtypes = [ctypes.c_char_p]
    lib.srbinarize_kernel_supported.restype = ctypes.c_int
    return lib


def kernel_path() -> str:
    """The kernel path a session created now would use ("avx512", "avx2" or "scalar").

    Honours $SRBINARIZE_KERNEL; raises RuntimeError when it names an unknown or unsupported path.
    """
    buf = ctypes.create_string_buffer(512)
    if _library(library_path()).srbinarize_kernel_path(buf, len(buf)):
        raise RuntimeError(buf.value.decode())
    return buf.value.decode()


def kernel_supported(name: str) -> bool:
    """Whether this CPU can run the kernel path `name` (one of KERNEL_PATHS)."""
    if name not in KERNEL_PATHS:
        raise ValueError(f"unknown kernel path {name!r}; expected one of {KERNEL_PATHS}")
    return bool(_library(library_path()).srbinarize_kernel_supported(name.encode()))


class OnnxModelError(SrbinarizeError):
    """An .onnx file (or model bytes) that onnxruntime cannot load."""


def ort_session(path, providers=None, config=None, **session_options):
    """An ``onnxruntime.InferenceSession`` for `path` (file or serialized model bytes) with the library registered.

    Keyword arguments set ``onnxruntime.SessionOptions`` attributes, e.g. ``intra_op_num_threads=2``
    or ``graph_optimization_level=...``; `config` holds session config entries (e.g.
    ``{"session.intra_op.allow_spinning": "0"}``). The kernel path is read from $SRBINARIZE_KERNEL now.
    A missing, empty or unloadable model is one `OnnxModelError` naming it.
    """
    import onnxruntime as ort

    name = "the model bytes" if isinstance(path, bytes) else str(path)
    if not isinstance(path, bytes):
        if not Path(path).is_file():
            raise OnnxModelError(f"{name}: no such model file" if not Path(path).exists() else f"{name} is not a file")
        if Path(path).stat().st_size == 0:
            raise OnnxModelError(f"{name} is empty (0 bytes); expected an .onnx model")

    options = ort.SessionOptions()
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, str(value))
    for name, value in session_options.items():
        if not hasattr(options, name):
            raise TypeError(f"onnxruntime.SessionOptions has no attribute {name!r}")
        setattr(options, name, value)
    options.register_custom_ops_library(str(library_path()))
    source = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OnnxModelError(f"{name}: not a loadable ONNX model ({type(err).__name__}: {msg[:300]})") from None
