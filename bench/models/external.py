"""Models that bench did not define: built from a SPEC, fingerprinted, and checked before a run.

A SPEC names a function that returns an ``nn.Module`` mapping (normalized) images to logits:

* ``torchvision:NAME``: ``torchvision.models.get_model(NAME)``, random weights unless
  ``pretrained`` (then torchvision's default weights, downloaded by torchvision);
* ``timm:NAME``: ``timm.create_model(NAME)`` (the optional ``timm`` extra), likewise;
* ``MODULE:FACTORY``: any importable function (``FACTORY`` may be dotted, ``pkg.mod:Class.make``).

Keyword arguments go to the factory unchanged; ``num_classes`` is passed to torchvision and timm
when the caller gives it. Every failure (an unknown name, with close matches; a module that does
not import; a factory that raises or returns something else) is one :class:`BenchError` line.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from bench.errors import BenchError
from bench.models.names import NORMALIZE_PRESETS

__all__ = ["NORMALIZE_PRESETS", "build_from_spec", "check_logits", "parse_normalize", "state_hash"]

def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _torchvision(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    try:
        from torchvision import models
    except ImportError as exc:
        raise BenchError(f"--model torchvision:{name} needs torchvision ({exc})") from None
    known = models.list_models()
    if name not in known:
        raise BenchError(f"torchvision has no model '{name}'{_did_you_mean(name, known)}")
    weights = "DEFAULT" if pretrained else None
    return _call(f"torchvision:{name}", lambda: models.get_model(name, weights=weights, **kwargs))


def _timm(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise BenchError(f"--model timm:{name} needs the optional timm package: pip install 'bench[timm]'") from None
    known = timm.list_models()
    if name not in known:
        raise BenchError(f"timm has no model '{name}'{_did_you_mean(name, known)}")
    return _call(f"timm:{name}", lambda: timm.create_model(name, pretrained=pretrained, **kwargs))


def _factory(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise BenchError(f"invalid --model '{spec}': use torchvision:NAME, timm:NAME or MODULE:FACTORY")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a module that fails to import, whatever it raises
        raise BenchError(f"--model {spec}: cannot import module '{module_name}' ({type(exc).__name__}: {exc})") \
            from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            raise BenchError(f"--model {spec}: '{getattr(target, '__name__', module_name)}' has no attribute "
                             f"'{part}'{_did_you_mean(part, names)}")
        target = getattr(target, part)
    if not callable(target):
        raise BenchError(f"--model {spec}: '{attribute}' is not callable")
    return target


def _call(spec: str, make: Callable[[], Any]) -> nn.Module:
    try:
        module = make()
    except BenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the factory is the user's code
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BenchError(f"--model {spec}: the factory raised {type(exc).__name__}: {first}") from None
    if not isinstance(module, nn.Module):
        raise BenchError(f"--model {spec}: the factory returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def build_from_spec(spec: str, kwargs: dict[str, Any] | None = None, *, pretrained: bool = False) -> nn.Module:
    """The module ``spec`` names, built with ``kwargs`` (see the module docstring)."""
    kwargs = dict(kwargs or {})
    prefix, _, name = spec.partition(":")
    if prefix == "torchvision":
        return _torchvision(name, kwargs, pretrained)
    if prefix == "timm":
        return _timm(name, kwargs, pretrained)
    if pretrained:
        raise BenchError(f"--download fetches weights for torchvision: and timm: models only, not {spec}; "
                         "give --checkpoint")
    factory = _factory(spec)
    return _call(spec, lambda: factory(**kwargs))


def parse_normalize(value: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``None``, a preset name (``cifar10``, ``cifar100``, ``imagenet``), ``"MEAN/STD"`` with
    comma-separated channels (``0.5,0.5,0.5/0.25,0.25,0.25``) or a ``[mean, std]`` pair, as
    ``(mean, std)``; every std must be > 0 and every number finite."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.lower() in NORMALIZE_PRESETS:
        return NORMALIZE_PRESETS[value.lower()]
    try:
        if isinstance(value, str):
            mean_text, std_text = value.split("/")
            mean = tuple(float(v) for v in mean_text.split(","))
            std = tuple(float(v) for v in std_text.split(","))
        else:
            mean, std = (tuple(float(v) for v in part) for part in value)
    except (TypeError, ValueError):
        raise BenchError(f"invalid --normalize {value!r}: use {', '.join(NORMALIZE_PRESETS)} or MEAN/STD, e.g. "
                         "0.5,0.5,0.5/0.25,0.25,0.25") from None
    if len(mean) != len(std) or not all(s > 0 and s != float("inf") for s in std) or \
            not all(abs(m) != float("inf") and m == m for m in mean):
        raise BenchError(f"invalid --normalize {value!r}: mean and std need one finite number per channel, std > 0")
    return mean, std


def state_hash(module: nn.Module) -> str:
    """SHA-256 of ``module``'s state dict: every key, dtype, shape and the raw bytes of every
    tensor, in key order. Equal weights give equal hashes whatever the device or file layout."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def check_logits(model: nn.Module, x: torch.Tensor, num_classes: int, task: str, what: str) -> None:
    """Refuse ``model`` (one :class:`BenchError` line naming ``what``) unless it maps the batch
    ``x`` to finite logits of shape ``(len(x), num_classes)`` that are not probabilities (every
    row non-negative and summing to 1: attacks' losses on them are flat). Log-probabilities are
    logits shifted per row, so they are accepted."""
    with torch.no_grad():
        try:
            out = model(x)
        except Exception as exc:  # noqa: BLE001 - the user's forward pass
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise BenchError(f"{what} fails on a batch of shape {tuple(x.shape)}: {type(exc).__name__}: {first}") \
                from None
    if not isinstance(out, torch.Tensor):
        raise BenchError(f"{what} returns a {type(out).__name__}, not a tensor of logits")
    if out.dim() != 2 or out.shape[0] != len(x) or out.shape[1] != num_classes:
        raise BenchError(f"{what} maps a batch of {len(x)} images to shape {tuple(out.shape)}; the dataset needs "
                         f"({len(x)}, {num_classes}) logits (give the factory num_classes={num_classes}?)")
    if not torch.isfinite(out).all():
        raise BenchError(f"{what} returns non-finite logits (NaN or infinity)")
    if task == "multilabel" or num_classes < 2:
        return
    out = out.double()
    ones = torch.ones(len(x), dtype=out.dtype)
    if (out >= 0).all() and torch.allclose(out.sum(dim=1), ones, atol=1e-4):
        raise BenchError(f"{what} returns probabilities (rows sum to 1); bench needs logits: remove the final softmax")
