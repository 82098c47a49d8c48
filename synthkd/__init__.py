"""synthkd: distill image classifiers without their training data.

The library core lives here; the synthetic-data stage (``generators/``) and the stages wired
together (``pipelines/``) sit beside it in a checkout, reached as ``synthkd.generators`` and
``synthkd.pipelines`` through the links ``synthkd/generators`` and ``synthkd/pipelines`` (and
installed under those names by setuptools' package-dir), so nothing else of the checkout imports
as part of the package.
"""

__version__ = "0.1.0"
