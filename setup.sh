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

# torch and torchvision from PyPI itself, as one matching pair: torchvision's compiled operators
# must be those of the installed torch (PyPI's torchvision over a CPU-only torch from another index
# fails at `import torchvision`). PyPI's torch 2.13.0 is the CUDA build, which also runs on CPU and
# which a GPU machine needs anyway (~2.6 GB with its CUDA libraries). Local pip configuration
# (extra indexes, find-links, constraints) is left out of this one command so that both come from PyPI.
# Skipped where a torch and torchvision that import together are installed already; a torch of
# another build (e.g. 2.13.0+cpu, which satisfies ==2.13.0) is replaced.
if ! python3 -c "import torch, torchvision" >/dev/null 2>&1; then
    REPLACE=""
    python3 -c "import torch" >/dev/null 2>&1 && REPLACE="--force-reinstall"
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        python3 -m pip install -q --disable-pip-version-check --index-url https://pypi.org/simple $REPLACE \
        torch==2.13.0 torchvision==0.28.0
fi
# The package with every extra the tests use: timm, datasets, onnx, onnxscript, onnxruntime, ...
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
