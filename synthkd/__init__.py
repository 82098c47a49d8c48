"""synthkd: distill image classifiers without their training data.

The library core lives here; the synthetic-data stage (``generators/``) and the stages wired
together (``pipelines/``) sit beside it in a checkout and are installed as ``synthkd.generators``
and ``synthkd.pipelines`` (setuptools package-dir), so install the checkout (``pip install -e .``,
as setup.sh does) before importing them.
"""

__version__ = "0.1.0"
