"""``python -m bench`` is the same as the ``bench`` command."""

from bench.cli import main

main()
