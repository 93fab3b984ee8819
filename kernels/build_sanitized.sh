#!/usr/bin/env bash
# Build the kernel library with AddressSanitizer + UndefinedBehaviorSanitizer into a temporary
# directory and run tests/test_kernels.py against it (every kernel path this CPU supports).
# Usage: bash kernels/build_sanitized.sh [extra pytest args]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[[ -x "$python" ]] || python=python3
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$python" "$root/kernels/build.py" --sanitize -o "$tmp/libsrbinarize_ort.so"
# The ASan runtime must be loaded before anything else in the (uninstrumented) Python process, and
# libstdc++ with it: ASan intercepts __cxa_throw and must find the real one at start-up.
preload="$(${CXX:-g++} -print-file-name=libasan.so) $(${CXX:-g++} -print-file-name=libstdc++.so)"
echo "running tests/test_kernels.py with $tmp/libsrbinarize_ort.so (LD_PRELOAD=$preload)"
cd "$root"
# detect_leaks=0: CPython and onnxruntime keep allocations alive at exit by design.
# SRBINARIZE_TEST_SANITIZE: the tests' emulated AVX-512 build (CPUs without AVX-512) is sanitized too.
SRBINARIZE_ORT_LIBRARY="$tmp/libsrbinarize_ort.so" SRBINARIZE_TEST_SANITIZE=1 LD_PRELOAD="$preload" \
    ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$python" -m pytest -q -p no:cacheprovider tests/test_kernels.py "$@"
