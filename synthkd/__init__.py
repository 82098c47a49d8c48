"""synthkd: distill image classifiers without their training data."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# generators/ and pipelines/ sit beside this package in a source checkout and are installed as
# synthkd.generators / synthkd.pipelines (setuptools package-dir); let a checkout import them
# under the same names.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "generators").is_dir() and (_checkout / "generators" / "base.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 (package __path__)
