"""``python -m bench.cli`` is the same as the ``bench`` command."""

from bench.cli import main

main()
