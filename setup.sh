#!/usr/bin/env bash
# Set up a fresh machine for synthkd: Fashion-MNIST from Debian where apt is available, torch and
# torchvision from PyPI as a matching pair, then the package itself with its test extras.
# Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
        echo "setup: could not install dataset-fashion-mnist; the demo falls back to scikit-learn digits" >&2
    fi
fi

# torch and torchvision as one matching pair: torchvision's compiled operators must be those of the
# installed torch (a torchvision over a torch of another build fails at `import torchvision`).
# Skipped where a torch and torchvision that import together are installed already. pip uses its
# own configuration (index, find-links, constraints). 2.14.1 is the CUDA build where the index
# serves it, which also runs on CPU.
if ! python3 -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "setup: installing torch 2.14.1 and torchvision 0.29.1 (no torch and torchvision that import together here)" >&2
    python3 -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
# The package with every extra the tests use: timm, datasets, onnx, onnxscript, onnxruntime, ...
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
