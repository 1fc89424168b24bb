"""Shared backbones and layers (:mod:`bench.models.backbones`, :mod:`bench.models.defended`,
:mod:`bench.models.normalize`). Everything works on images in [0, 1]; normalization is the
first layer of every :class:`~bench.models.defended.DefendedModel`.

This package's ``__init__`` imports nothing heavy: :mod:`bench.models.names` is read while a
run's configuration is resolved, before torch is needed.
"""

from __future__ import annotations
