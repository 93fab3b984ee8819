"""Build hook: compiles the onnxruntime custom-op library into the package during `pip install`.

All metadata lives in pyproject.toml. The library (kernels/, see kernels/build.py) is written to
srbinarize/runtime/libsrbinarize_ort.so: into the wheel's build directory for `pip install .`, into
the source tree for `pip install -e .`. It needs the onnxruntime C API headers, fetched once with
`bash kernels/fetch_ort_headers.sh` (or pointed to by $ORT_INCLUDE_DIR).
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIBRARY = Path("srbinarize", "runtime", "libsrbinarize_ort.so")


class BuildWithKernels(build_py):
    def run(self):
        super().run()
        spec = importlib.util.spec_from_file_location("srbinarize_kernels_build", ROOT / "kernels" / "build.py")
        kernels_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kernels_build)
        target = ROOT / LIBRARY if self.editable_mode else Path(self.build_lib) / LIBRARY
        print(f"srbinarize: building {target}")
        kernels_build.build(target)


setup(cmdclass={"build_py": BuildWithKernels})
