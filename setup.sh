#!/usr/bin/env bash
# Set up a fresh machine for synthkd: the CPU build of torch first (a plain `torch` requirement
# would pull a CUDA build of several GB), Fashion-MNIST from Debian where apt is available,
# then the package itself with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo"
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >/dev/null; then
        echo "setup: could not install dataset-fashion-mnist; the demo falls back to scikit-learn digits" >&2
    fi
fi

python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
