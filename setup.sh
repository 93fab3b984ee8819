#!/usr/bin/env bash
# Set up srbinarize in ./.venv on a fresh machine, then run the main job on the embedded default model:
# the project's pretrained FP EDSR x2 -> SCALES binary conversion -> a short finetune -> evaluation on
# Set5/Set14 -> a report in runs/demo/. Safe to run again.
#
#   bash setup.sh                 # set up + demo (DEMO_MINUTES=3 by default)
#   SKIP_DEMO=1 bash setup.sh     # set up only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch 2.14.1 + torchvision 0.29.1 is the pair that imports together here (see README, "Why these pins");
# it must be in place before basicsr-fixed builds, which imports torch in its setup (hence no isolation).
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" setuptools wheel
# The onnxruntime C API headers for the kernel library (not shipped in the onnxruntime wheel).
bash kernels/fetch_ort_headers.sh
"${pip[@]}" --no-build-isolation ".[dev]"
.venv/bin/python -m pip check

if [[ -z "${SKIP_DEMO:-}" ]]; then
    .venv/bin/srbinarize demo --minutes "${DEMO_MINUTES:-3}" -o runs/demo
fi
