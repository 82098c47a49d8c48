"""The built-in dataset kinds, one module each; every module here registers itself in
:data:`synthkd.data.datasets.DATASETS` when the registry is first used."""
