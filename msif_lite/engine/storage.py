"""Keyed, checksummed, atomically written caches (EK-FAC factors, gradients, indexes).

Every artifact is one safetensors file whose header records what it was computed from
(an `ArtifactKey`) and a sha256 checksum. Loading never runs code (no pickle), refuses
corrupt files and refuses files computed from another model, dataset or settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file as _st_save_file

FORMAT_VERSION = "1"
_PREFIX = "msif_lite."
_KEY_FIELDS = ("kind", "model", "data", "settings")
log = logging.getLogger(__name__)


class ArtifactError(ValueError):
    """An artifact cannot be used (base class)."""


class CorruptArtifactError(ArtifactError):
    """The file is truncated, garbage, not an artifact, or fails its checksum."""


class StaleArtifactError(ArtifactError):
    """The file is intact but was computed from another model, dataset or settings."""


# ---------------------------------------------------------------- fingerprints
def _json_default(o: Any) -> Any:
    if isinstance(o, (Path, torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, (enum.Enum, np.generic)):
        return o.value if isinstance(o, enum.Enum) else o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"cannot fingerprint {type(o).__name__!r}: convert it to str/number/list/dict")


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _update_tensor(h: Any, t: torch.Tensor) -> None:
    if t.layout != torch.strided or t.is_meta:
        raise TypeError(f"cannot fingerprint a {t.layout} / meta tensor; densify it first")
    t = t.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())


def tensor_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over names, dtypes, shapes and raw bytes, in sorted name order."""
    h = hashlib.sha256(b"msif-tensors-v1\n")
    for name in sorted(tensors):
        h.update(f"{len(name)}:{name}|".encode())
        _update_tensor(h, tensors[name])
    return h.hexdigest()


_CONFIG_NOISE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                 "_commit_hash", "_attn_implementation_autoset", "_attn_implementation")


def model_fingerprint(model: torch.nn.Module, param_names: Iterable[str] | None = None) -> str:
    """Fingerprint of the model: every parameter, every buffer and the config fields that
    change the function (a cache keyed by it is refused after any weight changes, tracked or
    not). `param_names` restricts it to those parameters (tests of the engine only)."""
    params = dict(model.named_parameters())
    if param_names is not None:
        names = list(param_names)
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"model has no parameters {missing}; see model.named_parameters()")
        return tensor_fingerprint({n: params[n] for n in names})
    tensors = {f"param:{n}": p for n, p in params.items()}
    tensors |= {f"buffer:{n}": b for n, b in model.named_buffers()}
    h = hashlib.sha256(tensor_fingerprint(tensors).encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        d = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
        h.update(_canonical_json(d).encode())
    return h.hexdigest()


def data_fingerprint(items: Iterable) -> str:
    """sha256 of a stream of str / bytes / tensors / arrays / JSON-able objects (order matters)."""
    h = hashlib.sha256(b"msif-data-v1\n")
    for item in items:
        if isinstance(item, str):
            b = item.encode("utf-8")
            h.update(b"s%d:" % len(b) + b)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            b = bytes(item)
            h.update(b"b%d:" % len(b) + b)
        elif isinstance(item, torch.Tensor):
            h.update(b"t")
            _update_tensor(h, item)
        elif isinstance(item, np.ndarray):
            a = np.ascontiguousarray(item)
            h.update(f"a{a.dtype.str}|{a.shape}|{a.nbytes}:".encode() + a.tobytes())
        else:
            b = _canonical_json(item).encode()
            h.update(b"j%d:" % len(b) + b)
    return h.hexdigest()


def config_fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of a dataclass (via `asdict`) or a dict."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return hashlib.sha256(_canonical_json(obj).encode()).hexdigest()


# ---------------------------------------------------------------- keys
_FIX = {
    "kind": "this file holds a different kind of artifact; point to the right file",
    "model": "these {kind} were computed on another model (other weights); recompute them "
    "(cached(..., refresh=True) or delete the file) or point to the right cache directory",
    "data": "these {kind} were computed on a different dataset / token stream; recompute "
    "them or point to the cache for this data",
    "settings": "these {kind} were computed with different settings (damping, layers, "
    "batch size, ...); recompute them or restore the settings used",
}


@dataclasses.dataclass(frozen=True)
class ArtifactKey:
    """What an artifact was computed from; two artifacts are interchangeable iff keys match."""

    kind: str
    model: str
    data: str
    settings: str

    def describe_mismatch(self, other: ArtifactKey) -> list[str]:
        """One line per field where `other` (found) differs from `self` (expected)."""
        lines = []
        for f in _KEY_FIELDS:
            want, got = getattr(self, f), getattr(other, f)
            if want != got:
                what = "kind" if f == "kind" else f"{f} fingerprint"
                fix = _FIX[f].format(kind=repr(other.kind))
                n = None if f == "kind" else 16  # fingerprints: show a prefix
                lines.append(f"{what} differs (file: {got[:n]!r}, expected: {want[:n]!r}): {fix}")
        return lines


# ---------------------------------------------------------------- atomic writes
class CacheWriteError(OSError, ValueError):
    """A cache file could not be written: a read-only or unwritable cache folder, or a full
    disk. The message names the folder and the fix; `errno` is the original one. Also a
    ValueError, so `msif-lite` reports it as a user error (exit 2, no traceback)."""

    def __str__(self) -> str:
        return str(self.strerror)


_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
CACHE_SETTING = "AttributionConfig(cache_dir=…) / msif-lite trace --cache-dir DIR"


def friendly_os_error(e: OSError, path: str | os.PathLike) -> OSError:
    """A `CacheWriteError` naming the cache folder and the fix for an OSError of writing
    `path` (read-only file system, no permission, disk full, quota), else `e` unchanged."""
    if isinstance(e, CacheWriteError):
        return e
    p = Path(path)
    folder = p if p.is_dir() else p.parent
    why = os.strerror(e.errno) if e.errno is not None else str(e)
    if e.errno in _NOT_WRITABLE:
        msg = (f"cannot write to the cache folder {folder} ({why}): make it writable, or point "
               f"the cache to a folder you can write: {CACHE_SETTING}")
    elif e.errno in _FULL:
        msg = (f"the disk holding the cache folder {folder} is full ({why}) while writing "
               f"{p.name}; nothing half-written was left. Free space there (the cache can be "
               "deleted: it is recomputed), lower AttributionConfig.gradient_cache_gb so that "
               "candidate gradients are streamed instead of stored, or point the cache to a "
               f"disk with room: {CACHE_SETTING}")
    else:
        return e
    err = CacheWriteError(e.errno, msg)
    err.filename = str(folder)
    return err


def _raise_friendly(e: OSError, path: Path):
    err = friendly_os_error(e, path)
    if err is e:
        raise e
    raise err from e


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """`write(tmp)` a temp file beside `path`, fsync it, then os.replace: readers never see
    half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        _raise_friendly(e, path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            _raise_friendly(e, path)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX; best effort)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) via temp file + fsync + os.replace; readers never see half a file."""
    return _atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"
    return atomic_write_text(path, text)


# ---------------------------------------------------------------- artifacts
def _checksum(header: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> str:
    body = {k: v for k, v in header.items() if k != _PREFIX + "checksum"}
    payload = _canonical_json(body) + "\n" + tensor_fingerprint(tensors)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_artifact(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    key: ArtifactKey,
    meta: Mapping | None = None,
) -> Path:
    """Atomically write `tensors` + `key` + JSON `meta` as one checksummed safetensors file."""
    flat: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        flat[name] = t.clone() if ptr in seen and t.numel() else t  # safetensors: no sharing
        seen.add(ptr)
    header = {_PREFIX + "format": FORMAT_VERSION, _PREFIX + "meta": _canonical_json(meta or {})}
    header.update({_PREFIX + f: getattr(key, f) for f in _KEY_FIELDS})
    header[_PREFIX + "checksum"] = _checksum(header, flat)
    # safetensors' save_file writes from the tensors' own memory (its `save` would build the
    # whole file as bytes first: a second copy of every factor at the fit's peak)
    return _atomic_write(path, lambda tmp: _st_save_file(flat, tmp, metadata=header))


def load_artifact(
    path: str | os.PathLike,
    expect: ArtifactKey | None = None,
    *,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify an artifact; returns (tensors, meta). Never unpickles anything."""
    path = Path(path)
    redo = f"delete {path} and recompute it"
    if not path.is_file():
        what = f"a {expect.kind!r} artifact" if expect else "an artifact"
        raise FileNotFoundError(
            f"no artifact at {path}: expected {what} written by "
            "msif_lite.engine.storage.save_artifact / "
            "cached() (the step that computes it); run that step first or fix the path"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # truncated, garbage, pickle, ... (SafetensorError and friends)
        raise CorruptArtifactError(
            f"{path} is not a readable safetensors artifact ({type(e).__name__}: {e}); it may be "
            f"truncated by an interrupted copy or not an msif-lite file; {redo}"
        ) from None
    version = header.get(_PREFIX + "format")
    if version is None or _PREFIX + "checksum" not in header:
        raise CorruptArtifactError(f"{path} is safetensors but not an msif-lite artifact; {redo}")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format {version!r} (this version reads {FORMAT_VERSION!r}); {redo}"
        )
    if header[_PREFIX + "checksum"] != _checksum(header, tensors):
        raise CorruptArtifactError(
            f"{path} fails its checksum (contents changed after it was written); {redo}"
        )
    try:
        found = ArtifactKey(**{f: header[_PREFIX + f] for f in _KEY_FIELDS})
        meta = json.loads(header[_PREFIX + "meta"])
    except (KeyError, ValueError) as e:
        raise CorruptArtifactError(f"{path} has an incomplete header ({e}); {redo}") from None
    if expect is not None and found != expect:
        lines = "\n  - ".join(expect.describe_mismatch(found))
        raise StaleArtifactError(f"{path} does not match what was asked for:\n  - {lines}")
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def cached(
    path: str | os.PathLike,
    key: ArtifactKey,
    compute: Callable[[], tuple[dict[str, torch.Tensor], dict]],
    *,
    refresh: bool = False,
) -> tuple[dict, dict]:
    """Load the artifact at `path` if it is valid for `key`; else compute, save and return it.

    Stale or corrupt files are recomputed and overwritten (with a logged warning).
    """
    path = Path(path)
    if not refresh and path.exists():
        try:
            return load_artifact(path, key)
        except ArtifactError as e:
            log.warning("recomputing %s artifact: %s", key.kind, e)
    tensors, meta = compute()
    save_artifact(path, tensors, key, meta)
    return dict(tensors), json.loads(_canonical_json(meta or {}))
