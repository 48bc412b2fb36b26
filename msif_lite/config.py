"""Kit-wide switches: the device helper, the fast-mode switch and the `cmp` table
(notebook 00, "Tour and setup", introduces all three), and the command-line options generated
from config dataclasses (`add_config_options`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import typing
from collections.abc import Sequence

import torch

FAST_ENV = "MSIF_FAST"
MMAP_THRESHOLD = 65536  # bytes: glibc mmaps allocations at least this large
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)


def fast_mode() -> bool:
    """True when problem sizes should shrink for CI (`MSIF_FAST=1`).

    This is the kit's one documented switch: notebooks and benchmarks read it to
    pick small sizes. Unset or `0` means full size.
    """
    return os.environ.get(FAST_ENV, "0").strip().lower() not in {"", "0", "false", "no"}


def pick(full, fast):
    """Return `fast` under fast mode, else `full` (sizes in notebooks and scripts)."""
    return fast if fast_mode() else full


def device() -> torch.device:
    """The device the kit trains and scores on: the first CUDA GPU if present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_run() -> str:
    """One line naming the device and mode, for notebooks to print with their outputs."""
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return f"device={dev.type} ({name}), mode={'fast' if fast_mode() else 'full'}"


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, dict):
        return torch.cat([torch.as_tensor(v).detach().reshape(-1).double() for v in x.values()])
    return torch.as_tensor(x).detach().double().reshape(-1)


def cmp(name: str, ours, reference, atol: float = 1e-8, rtol: float = 1e-6) -> dict:
    """Compare a hand-derived quantity with the library's (Karpathy's makemore style).

    Prints one row: name | exact? | close? | max |ours - ref| | relative error, and
    returns the row as a dict so tests and notebooks can assert on it.
    """
    a, b = _as_tensor(ours), _as_tensor(reference)
    if a.shape != b.shape:
        raise ValueError(f"cmp({name!r}): shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    rel = diff / max(b.abs().max().item(), 1e-300) if b.numel() else 0.0
    row = {
        "name": name,
        "exact": bool(torch.equal(a, b)),
        "close": bool(torch.allclose(a, b, atol=atol, rtol=rtol)),
        "max_abs_diff": diff,
        "rel_err": rel,
    }
    print(
        f"{name:<32s} | exact: {str(row['exact']):5s} | close: {str(row['close']):5s}"
        f" | maxdiff: {diff:.2e} | rel: {rel:.2e}"
    )
    return row


def cmp_table(rows: Sequence[tuple[str, object, object]], **kw) -> list[dict]:
    """`cmp` for several rows at once, with a header."""
    print(f"{'quantity':<32s} | {'exact':12s} | {'close':12s} | {'max diff':14s} | rel err")
    return [cmp(n, a, b, **kw) for n, a, b in rows]


# ---------------------------------------------------------------------------- config fields
def help_field(text: str, default, **metadata):
    """A dataclass field with its help text (and e.g. `cli="--flag"`) in its metadata: the one
    description the config's `help()`, the CLI and the memory planner read."""
    return dataclasses.field(default=default, metadata={"help": text, **metadata})


def fields_help(cls) -> str:
    """One line per field of the dataclass `cls`: its name and help text."""
    return "\n".join(f"{f.name}: {f.metadata.get('help', '')}" for f in dataclasses.fields(cls))


def _option_type(cls, name: str) -> tuple[type, list | None]:
    """The scalar type of a dataclass field (`int | None` → int) and, for a `Literal`, its
    values as the option's choices."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is not typing.Literal and len(args) == 1:
        hint = args[0]  # `X | None` → X
    if typing.get_origin(hint) is typing.Literal:
        values = list(typing.get_args(hint))
        return type(values[0]), values
    return (args or [hint])[0], None


def add_config_options(parser, cls, choices: dict | None = None) -> None:
    """One command-line option per field of the dataclass `cls` whose metadata names one
    (`metadata={"cli": "--flag", "help": …}`), its help text and default from the field: the
    options are generated from the config, never written twice. Each option's value is None
    unless given (the config then keeps its own default; `config_kwargs`)."""
    choices = choices or {}
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("cli")
        if flag is None:
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        kind, literal = _option_type(cls, f.name)
        parser.add_argument(flag, dest=f.name, type=kind, default=None,
                            choices=choices.get(f.name, literal),
                            help=f"{f.metadata['help']} (default {default!r})".replace(
                                "%", "%%"))  # argparse formats help with %


def config_kwargs(cls, namespace) -> dict:
    """The fields of `cls` given on the command line (`add_config_options`), as keywords."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is not None and getattr(namespace, f.name, None) is not None:
            out[f.name] = getattr(namespace, f.name)
    return out


def trim_allocator(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc mmap every allocation of at least `threshold` bytes and unmap it when freed
    (a fixed threshold: the dynamic raise is off), so resident memory follows the live tensor
    bytes the memory plan predicts. Returns False where it cannot (not glibc). Call it at the
    start of a process; tensors allocated before the call keep their heap pages."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
