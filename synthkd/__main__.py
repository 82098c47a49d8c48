"""``python -m synthkd``: the CLI, so ``accelerate launch -m synthkd ...`` works."""

from .cli import main

main(prog_name="synthkd")
