"""Checkpoint files: the cache of trained models and loading of user-supplied checkpoints.

Trained models are cached under ``$BENCH_HOME/checkpoints`` (default ``~/.cache/bench``) by the
hash of their training configuration, and written atomically (a crash never leaves a partial
file under the final name) and once: :func:`checkpoint_lock` serializes the processes that would
train the same model, so the second waits and loads the first one's file instead of rewriting
it under a run that recorded its hash.

Every file a user hands in is read without executing anything it holds: torch files only through
``torch.load(weights_only=True)``, safetensors through ``safetensors.torch.load_file``; pickles are
never unpickled, only parsed (:mod:`pickletools`) to say why a file was refused. The layouts read
are listed in docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.errors import CheckpointError
from bench.paths import atomic_write, cache_subdir

FORMAT = "bench-checkpoint-1"


def listed(items: Any, limit: int = 4) -> str:
    """The first ``limit`` items, comma-separated, and how many more there are."""
    items = list(items)
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def key_mismatches(target: Any, state: Any) -> tuple[list[str], list[str], list[str]]:
    """How ``state`` (a state dict) fails to fit ``target`` (a model's state dict): the missing
    keys, the unexpected keys and one line per shape mismatch, each sorted."""
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(target[k].shape)}"
              for k in target if k in state and tuple(getattr(state[k], "shape", ())) != tuple(target[k].shape)]
    return missing, unexpected, shapes


def checkpoint_dir() -> Path:
    return cache_subdir("checkpoints")


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _first_sentence(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text.split(". ")[0].rstrip(".")[:300]


@contextlib.contextmanager
def checkpoint_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (``fcntl.flock``; waits for another holder):
    whoever holds it may check, train and write ``path``. The lock ends with the process, so a
    killed holder never blocks the next one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_save(path: Path, obj: Any) -> None:
    """``torch.save`` to a temporary file, then rename: ``path`` is never half-written. A write
    that fails (a full disk, a read-only folder) is a :class:`CheckpointError` and leaves nothing."""
    import torch

    try:
        atomic_write(path, lambda tmp: torch.save(obj, tmp))
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_sentence(exc)
        raise CheckpointError(f"cannot write {path}: {reason}") from None


def save_checkpoint(path: Path, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write ``{"format", "state_dict", "meta"}`` atomically to ``path``."""
    atomic_save(path, {"format": FORMAT, "state_dict": state_dict, "meta": meta})


# -- reading a checkpoint file someone hands in -------------------------------------------------------------------
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
MAX_NESTING = 3  # wrappers unwrapped at most: {"model": {"state_dict": ...}} takes two
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # (Distributed)DataParallel, torch.compile
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy (non-zip) torch.save file
_LEGACY_HEADER = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."  # that number as torch.save pickles it by default
_LEGACY_PICKLES = 4  # magic number, protocol version, system info, then the saved object
_SAFETENSORS_HEADER_MAX = 100_000_000  # the safetensors library's own limit on its JSON header
# globals the weights-only loader accepts besides torch's own: only the wording of a refusal depends on them
_PLAIN_GLOBALS = frozenset({"collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset",
                            "builtins.bytearray", "builtins.complex", "builtins.slice"})
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".tar", ".bin", ".ckpt", ".safetensors")


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``path`` without executing anything in it and return ``(state_dict, meta)``.

    Read: ``torch.save`` files, zip or legacy, only through ``torch.load(weights_only=True)``;
    safetensors files (the ``.safetensors`` suffix, or the content: an 8-byte little-endian header
    length, then a JSON header) through ``safetensors.torch.load_file``. The state dict may be bare,
    bench's own ``{"format", "state_dict", "meta"}``, or under one of :data:`WRAPPER_KEYS`, nested
    up to :data:`MAX_NESTING` deep, beside other entries (an epoch, a best accuracy, an optimizer
    state). A prefix of :data:`STRIPPED_PREFIXES` shared by every key is removed. ``meta`` is
    bench's ``meta`` entry, or the safetensors header's metadata, else ``{}``. Anything else (see
    docs/checkpoints.md) is a one-line :class:`CheckpointError` that names the file.
    """
    name = str(path)
    kind = _sniff(name)
    if kind == "safetensors":
        state, meta = _load_safetensors(name)
    else:
        state, meta = _unwrap(_torch_load(name, kind))
    _check_tensor_dict(name, state)
    return _strip_prefixes(state), meta


def _sniff(name: str) -> str:
    """What the file holds, from its first bytes: ``"safetensors"`` (or the suffix says so),
    ``"zip"``, ``"legacy"`` (torch.save without zip) or ``"pickle"`` (a pickle torch.save did not
    write). A file that is none of these is a :class:`CheckpointError`."""
    head, size = _head(name)
    if name.endswith(".safetensors") or _looks_safetensors(head, size):
        return "safetensors"
    if head.startswith(b"PK"):
        return "zip"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle's PROTO opcode
        return "legacy" if _has_legacy_magic(head) else "pickle"
    raise CheckpointError(f"{name} is not a model checkpoint: neither a PyTorch file (zip or legacy) nor safetensors")


def _head(name: str) -> tuple[bytes, int]:
    """The first 64 bytes of ``name`` and its size; a missing, empty or unreadable file, or a
    directory, is a :class:`CheckpointError`."""
    if os.path.isdir(name):
        raise CheckpointError(f"{name} is a directory, not a checkpoint file{_inside(name)}")
    if not os.path.exists(name):
        raise CheckpointError(f"checkpoint file not found: {name}")
    if not os.path.isfile(name):
        raise CheckpointError(f"{name} is not a regular file, so not a checkpoint")
    try:
        with open(name, "rb") as fh:
            head, size = fh.read(64), os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {name}: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"{name} is empty (0 bytes), not a model checkpoint")
    return head, size


def _inside(folder: str) -> str:
    with contextlib.suppress(OSError):
        found = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.endswith(_CHECKPOINT_SUFFIXES))
        if found:
            return f"; give the file itself: {found[0]}" if len(found) == 1 else \
                f"; give the file itself, one of {listed(found, 3)}"
    return ""


def _looks_safetensors(head: bytes, size: int) -> bool:
    length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 2 <= length <= min(size - 8, _SAFETENSORS_HEADER_MAX)


def _has_legacy_magic(head: bytes) -> bool:
    """Whether ``head`` starts with the pickled magic number of a legacy torch.save file (read with
    :mod:`pickletools`, which only parses); a file cut short inside the usual header counts too."""
    if _LEGACY_HEADER.startswith(head[:len(_LEGACY_HEADER)]):
        return True
    try:
        return any(arg == _LEGACY_MAGIC for _, arg, _ in pickletools.genops(io.BytesIO(head)))
    except (ValueError, struct.error):
        return False


def _load_safetensors(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(name, device="cpu")
        with safe_open(name, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{name} is not a readable safetensors file ({_first_sentence(exc)})") from None
    return state, {str(k): _json_or_text(str(v)) for k, v in metadata.items()}


def _json_or_text(value: str) -> Any:
    """A safetensors metadata value (always a string): a JSON object or list is decoded."""
    if value[:1] in ("{", "["):
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def _torch_load(name: str, kind: str) -> Any:
    """``torch.load(weights_only=True)``; its failures become one-line :class:`CheckpointError` s."""
    import torch

    if kind == "pickle":  # torch.load would refuse it anyway: no torch.save header
        raise _plain_pickle_error(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on pickle protocols: the error says enough
            return torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refusal(name, kind, exc) from None
    except Exception as exc:  # any other failure of the reader on a file it accepted: corrupt or cut short
        raise _unreadable(name, kind, _reason(exc)) from None


def _reason(exc: BaseException) -> str:
    """The informative part of ``exc``: the weights-only unpickler's own line, else the first sentence."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        lines = [ln.strip() for ln in text.split(marker, 1)[1].splitlines() if ln.strip()]
        if lines:
            return lines[0].split(". ")[0].rstrip(".")[:300]
    return _first_sentence(exc)


def _refusal(name: str, kind: str, exc: pickle.UnpicklingError) -> CheckpointError:
    """Why the weights-only unpickler refused a torch file: Python objects in a complete pickle, or
    a truncated or corrupt file, or (neither) a construct it does not read."""
    problem, names = _pickle_globals(name, kind)
    if problem is not None:
        return _unreadable(name, kind, problem)
    objects = re.findall(r"Unsupported global: GLOBAL (\S+)", str(exc)) or [g for g in names if not _plain(g)]
    if objects:
        return _python_objects(name, objects)
    return CheckpointError(f"{name} is a PyTorch file that weights_only=True cannot read ({_reason(exc)})")


def _plain_pickle_error(name: str) -> CheckpointError:
    problem, names = _pickle_globals(name, "pickle")
    objects = [g for g in names if not _plain(g)]
    if objects:
        return _python_objects(name, objects)
    return CheckpointError(f"{name} is not a model checkpoint: a plain pickle (pickle.dump), not a torch.save file; "
                           "save the state dict with torch.save or safetensors")


def _python_objects(name: str, objects: list[str]) -> CheckpointError:
    return CheckpointError(f"refusing to load {name}: it holds Python objects ({listed(sorted(set(objects)), 3)}) "
                           "that weights_only=True refuses to execute; only tensors, plain containers, numbers "
                           "and strings are loaded")


def _unreadable(name: str, kind: str, reason: str) -> CheckpointError:
    if kind != "zip":
        return CheckpointError(f"{name} is not a complete PyTorch file: the legacy (non-zip) file is truncated "
                               f"or corrupt ({reason})")
    try:
        with zipfile.ZipFile(name) as archive:
            members = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return CheckpointError(f"{name} is not a complete PyTorch file: its zip archive is truncated or corrupt "
                               f"({reason})")
    if not any(m.endswith("data.pkl") for m in members):
        return CheckpointError(f"{name} is a zip archive but not a PyTorch file (no data.pkl; it holds "
                               f"{listed(members, 3) or 'nothing'})")
    return CheckpointError(f"{name} is not a readable PyTorch file ({reason})")


def _plain(qualified: str) -> bool:
    return qualified.startswith("torch.") or qualified in _PLAIN_GLOBALS


def _pickle_globals(name: str, kind: str) -> tuple[str | None, list[str]]:
    """The globals (``module.name``) that the file's pickles import, found by parsing alone
    (:mod:`pickletools`), with the reason the parse stopped early (None when every pickle was whole)."""
    try:
        if kind != "zip":
            with open(name, "rb") as fh:
                return _scan(fh, _LEGACY_PICKLES if kind == "legacy" else 1)
        with zipfile.ZipFile(name) as archive:
            members = [m for m in archive.namelist() if m.endswith("data.pkl")]
            if not members:
                return "no data.pkl in the archive", []
            with archive.open(members[0]) as fh:
                return _scan(fh, 1)
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        return _first_sentence(exc), []


def _scan(stream: Any, count: int) -> tuple[str | None, list[str]]:
    names: list[str] = []
    for _ in range(count):
        try:
            names += _globals_of_one(stream)
        except (ValueError, struct.error, EOFError) as exc:
            return f"its pickle ends early or is corrupt: {_first_sentence(exc)}", names
    return None, names


def _globals_of_one(stream: Any) -> list[str]:
    """The globals imported by the next pickle in ``stream``. STACK_GLOBAL takes its module and
    name from the two values pushed before it, which may come from the memo."""
    memo: dict[int, Any] = {}
    pushed: list[Any] = [None, None]  # the last two values pushed: strings, else None
    names = []
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
            pushed.append(None)
        elif op.name == "STACK_GLOBAL":
            module, qualname = pushed[-2:]
            names.append(f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str)
                         else "an unnamed global")
            pushed.append(None)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1]
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg or 0)] = pushed[-1]
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg or 0)))
        else:
            pushed.append(arg if isinstance(arg, str) else None)
        del pushed[:-2]
    return names


def _unwrap(obj: Any) -> tuple[Any, dict[str, Any]]:
    """The state dict inside ``obj`` (through at most :data:`MAX_NESTING` wrappers) and bench's meta."""
    meta = obj["meta"] if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else {}
    for _ in range(MAX_NESTING):
        if not isinstance(obj, dict) or _all_tensors(obj):
            break
        inner = next((obj[key] for key in WRAPPER_KEYS if isinstance(obj.get(key), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj, meta


def _all_tensors(obj: dict[Any, Any]) -> bool:
    import torch

    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _check_tensor_dict(name: str, state: Any) -> None:
    if isinstance(state, dict) and state and _all_tensors(state):
        return
    raise CheckpointError(f"{name} holds no state dict of tensors: it holds {_describe(state)}; expected a state "
                          f"dict, bare or under one of {', '.join(repr(k) for k in WRAPPER_KEYS)}")


def _describe(obj: Any) -> str:
    import torch

    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}"
    if not obj:
        return "an empty dict"
    odd = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    return f"a dict with {len(odd)} non-tensor {'entry' if len(odd) == 1 else 'entries'}: {listed(odd, 3)}"


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the :data:`STRIPPED_PREFIXES` that every key shares (repeatedly: a
    compiled DataParallel model has both); keys are left alone when any key lacks the prefix."""
    for _ in range(len(STRIPPED_PREFIXES) * 2):
        prefix = next((p for p in STRIPPED_PREFIXES if all(str(k).startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {str(k)[len(prefix):]: v for k, v in state.items()}
    return state


def check_meta_defense(meta: dict[str, Any], defense_name: str, source: str, dataset: str | None = None) -> None:
    """Refuse a checkpoint that bench trained for another defense or, when ``dataset`` is given, on
    another dataset, as its ``meta`` records (``meta["defense"]``, ``meta["dataset"]``). Meta without
    these entries (a file from elsewhere) passes: there is nothing to check."""
    trained = meta.get("defense")
    if isinstance(trained, str) and trained != defense_name:
        raise CheckpointError(f"checkpoint {source} was trained by bench for defense '{trained}', not "
                              f"'{defense_name}': run it with --defense {trained}, or give a checkpoint of "
                              f"'{defense_name}'")
    on = meta.get("dataset")
    if dataset is not None and isinstance(on, str) and on != dataset:
        raise CheckpointError(f"checkpoint {source} was trained by bench on dataset '{on}', not '{dataset}': "
                              f"evaluate it with --dataset {on}, or give a checkpoint trained on '{dataset}'")


# -- loading a state dict into a model ----------------------------------------------------------------------------
def load_into(defense: Any, model: Any, state: dict[str, Any], source: str) -> None:
    """Load ``state`` into ``model`` through the defense's adapter (``defense.load_state_dict``,
    which may rename an official layout). A misfit is one :class:`CheckpointError` line: the missing
    and unexpected keys and shape mismatches with their counts when the model's own loader saw the
    keys as given, else the adapter's report. An adapter's own :class:`CheckpointError` passes unchanged."""
    try:
        defense.load_state_dict(model, state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {source} does not fit the model of defense '{defense.name}': "
                              f"{_misfit(model, state, str(exc))}") from None


def _misfit(model: Any, state: dict[str, Any], text: str) -> str:
    missing, unexpected, shapes = key_mismatches(model.state_dict(), state)
    if _loader_saw(text, missing, unexpected, shapes):
        return mismatch_summary(missing, unexpected, shapes)
    detail = "; ".join(ln.strip() for ln in text.splitlines() if ln.strip())
    return detail if len(detail) <= 500 else detail[:500] + "..."


def _loader_saw(text: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> bool:
    """Whether ``text`` is nn.Module.load_state_dict's report on ``state`` as given (the adapter did
    not rename it): it names every mismatch that :func:`key_mismatches` finds."""
    if not text.startswith("Error(s) in loading state_dict") or not (missing or unexpected or shapes):
        return False
    return (all(f'"{k}"' in text for k in missing + unexpected)
            and all(f"size mismatch for {line.split(':', 1)[0]}:" in text for line in shapes))


def mismatch_summary(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """One line: ``missing 3 keys (a, b, c); unexpected 2 keys (d, e); 1 shape mismatch (...)``,
    the first few of each, and a hint when the two key lists differ only by a prefix."""
    parts = []
    if missing:
        parts.append(f"missing {_count(len(missing), 'key')} ({listed(missing, 3)})")
    if unexpected:
        parts.append(f"unexpected {_count(len(unexpected), 'key')} ({listed(unexpected, 3)})")
    if shapes:
        parts.append(f"{_count(len(shapes), 'shape mismatch')} ({listed(shapes, 2)})")
    hint = _prefix_hint(missing, unexpected)
    return "; ".join(parts + ([hint] if hint else []))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('h') else 's'}"


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str | None:
    """Whether every unexpected key is a missing key less, or plus, one leading component."""
    wanted = set(missing)
    for prefix in sorted({k.split(".", 1)[0] + "." for k in missing if "." in k}):
        if unexpected and all(prefix + k in wanted for k in unexpected):
            return f"the checkpoint's keys lack the model's '{prefix}' prefix"
    for prefix in sorted({k.split(".", 1)[0] + "." for k in unexpected if "." in k}):
        if all(k.startswith(prefix) and k[len(prefix):] in wanted for k in unexpected):
            return f"the checkpoint's keys carry an extra '{prefix}' prefix"
    return None
