"""``bench`` whose protocol PGD fails on rank 1's second attack batch: a torchrun process that dies
mid-stage (tests/test_distributed.py runs it under torchrun in place of ``-m bench``)."""

from __future__ import annotations

from bench.attacks.pgd import PGD
from bench.cli import main
from bench.harness.checks import LARGE_EPS
from bench.training import distributed

_original = PGD.run
_calls = {"n": 0}


def _crashing_run(self, model, x, y, threat):  # type: ignore[no-untyped-def]
    if threat.eps != LARGE_EPS and distributed.rank() == 1:
        _calls["n"] += 1
        if _calls["n"] == 2:
            raise SystemExit(3)  # rank 1 dies; torchrun stops rank 0
    return _original(self, model, x, y, threat)


PGD.run = _crashing_run  # type: ignore[method-assign]
main()
