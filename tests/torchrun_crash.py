"""``bench`` whose protocol PGD fails on a rank's second attack batch (the ranks claim batches as
they go: whichever rank gets two first): a torchrun process that dies mid-stage
(tests/test_distributed.py runs it under torchrun in place of ``-m bench``)."""

from __future__ import annotations

from bench.attacks.pgd import PGD
from bench.cli import main
from bench.harness.checks import LARGE_EPS

_original = PGD.run
_calls = {"n": 0}


def _crashing_run(self, model, x, y, threat):  # type: ignore[no-untyped-def]
    if threat.eps != LARGE_EPS:
        _calls["n"] += 1
        if _calls["n"] == 2:
            raise SystemExit(3)  # this rank dies; torchrun stops the other
    return _original(self, model, x, y, threat)


PGD.run = _crashing_run  # type: ignore[method-assign]
main()
