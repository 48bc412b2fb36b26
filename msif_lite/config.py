"""Kit-wide switches: the device helper, the fast-mode switch and the `cmp` table.

Notebook 00 ("Tour and setup") introduces all three.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

FAST_ENV = "MSIF_FAST"


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
