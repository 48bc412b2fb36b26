"""Tests for msif_lite.engine.storage: keyed, checksummed, atomic, pickle-free caches."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from msif_lite.engine import storage
from msif_lite.engine.storage import (
    ArtifactError,
    ArtifactKey,
    CorruptArtifactError,
    StaleArtifactError,
    atomic_write_json,
    atomic_write_text,
    cached,
    config_fingerprint,
    data_fingerprint,
    load_artifact,
    model_fingerprint,
    save_artifact,
    tensor_fingerprint,
)

KEY = ArtifactKey(kind="ekfac-factors", model="m" * 64, data="d" * 64, settings="s" * 64)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(5, 7, generator=g),
        "f64": torch.randn(3, dtype=torch.float64, generator=g),
        "bf16": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


@pytest.fixture
def art(tmp_path):
    path = save_artifact(tmp_path / "cache" / "factors.safetensors", _tensors(), KEY, {"n": 3})
    return path


# ---------------------------------------------------------------- round trip
@pytest.mark.parametrize("meta", [None, {}, {"layers": ["a", "b"], "damping": 1e-3}])
def test_round_trip_bit_identical(tmp_path, meta):
    src = _tensors()
    path = save_artifact(tmp_path / "a" / "b" / "x.safetensors", src, KEY, meta)
    assert path.is_file()
    out, got_meta = load_artifact(path, KEY)
    assert got_meta == (meta or {})
    assert set(out) == set(src)
    for k, t in src.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t), k


def test_round_trip_non_contiguous_and_shared(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    src = {"t": base.T, "row": base[1], "base": base, "slice": base[:, ::2]}
    out, _ = load_artifact(save_artifact(tmp_path / "x.safetensors", src, KEY), KEY)
    for k, t in src.items():
        assert torch.equal(out[k], t), k


def test_save_and_load_empty_dict(tmp_path):
    out, meta = load_artifact(save_artifact(tmp_path / "e.safetensors", {}, KEY), KEY)
    assert out == {} and meta == {}


# ---------------------------------------------------------------- fingerprints
def test_tensor_fingerprint_deterministic_and_sensitive():
    a = _tensors()
    fp = tensor_fingerprint(a)
    assert fp == tensor_fingerprint(_tensors())
    assert fp == tensor_fingerprint(dict(reversed(list(a.items()))))  # order of dict irrelevant
    b = _tensors()
    b["f32"][2, 3] += 1e-6
    assert tensor_fingerprint(b) != fp
    c = _tensors()
    c["bf16"][0, 0] = -c["bf16"][0, 0]
    assert tensor_fingerprint(c) != fp
    x = torch.ones(3)
    assert tensor_fingerprint({"a": x}) != tensor_fingerprint({"b": x})  # names matter
    assert tensor_fingerprint({"a": x}) != tensor_fingerprint({"a": x.double()})  # dtype
    assert tensor_fingerprint({"a": x}) != tensor_fingerprint({"a": x.reshape(1, 3)})  # shape


def test_tensor_fingerprint_non_contiguous_equals_contiguous():
    t = torch.randn(4, 5)
    assert tensor_fingerprint({"t": t.T}) == tensor_fingerprint({"t": t.T.contiguous()})


def test_fingerprint_stable_across_processes():
    code = (
        "import torch; from msif_lite.engine.storage import tensor_fingerprint as f;"
        "print(f({'w': torch.arange(6.0).reshape(2, 3).to(torch.bfloat16)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = tensor_fingerprint({"w": torch.arange(6.0).reshape(2, 3).to(torch.bfloat16)})
    assert out.stdout.strip() == here


def test_model_fingerprint():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fp = model_fingerprint(m)
    assert fp == model_fingerprint(m)
    sub = model_fingerprint(m, ["0.weight"])
    assert sub != fp
    with torch.no_grad():
        m[1].weight[0, 0] += 1.0
    assert model_fingerprint(m) != fp
    assert model_fingerprint(m, ["0.weight"]) == sub  # untouched subset unchanged
    with pytest.raises(KeyError, match="nope"):
        model_fingerprint(m, ["nope"])


def test_data_fingerprint():
    ids = [[1, 2, 3], [4, 5]]
    fp = data_fingerprint(ids)
    assert fp == data_fingerprint([[1, 2, 3], [4, 5]])
    assert fp != data_fingerprint([[4, 5], [1, 2, 3]])  # order-sensitive
    assert fp != data_fingerprint([[1, 2, 3], [4, 6]])
    assert data_fingerprint(["ab", "c"]) != data_fingerprint(["a", "bc"])
    assert data_fingerprint(["abc"]) != data_fingerprint([b"abc"])
    assert data_fingerprint([torch.tensor([1, 2])]) != data_fingerprint([torch.tensor([1, 3])])
    assert data_fingerprint(x for x in ids) == fp  # generators work
    with pytest.raises(TypeError):
        data_fingerprint([object()])


def test_config_fingerprint():
    @dataclasses.dataclass
    class Cfg:
        damping: float = 1e-3
        layers: tuple = ("a", "b")

    fp = config_fingerprint(Cfg())
    assert fp == config_fingerprint({"layers": ["a", "b"], "damping": 1e-3})  # key order free
    assert fp != config_fingerprint(Cfg(damping=1e-4))


# ---------------------------------------------------------------- stale / corrupt
def test_key_mismatch_is_stale_and_names_fields(art):
    other = dataclasses.replace(KEY, model="x" * 64, settings="y" * 64)
    with pytest.raises(StaleArtifactError) as ei:
        load_artifact(art, other)
    msg = str(ei.value)
    assert "model fingerprint differs" in msg and "settings fingerprint differs" in msg
    assert "data fingerprint" not in msg and "recompute" in msg and str(art) in msg
    assert len(other.describe_mismatch(KEY)) == 2
    assert KEY.describe_mismatch(KEY) == []
    load_artifact(art)  # no expectation: loads fine


def test_missing_file(tmp_path):
    p = tmp_path / "nothing.safetensors"
    with pytest.raises(FileNotFoundError, match="nothing.safetensors") as ei:
        load_artifact(p, KEY)
    assert "ekfac-factors" in str(ei.value) and "cached" in str(ei.value)


def test_truncated_file(art):
    data = art.read_bytes()
    for n in (len(data) - 7, len(data) // 2, 5, 0):
        art.write_bytes(data[:n])
        with pytest.raises(CorruptArtifactError, match="delete") as ei:
            load_artifact(art, KEY)
        assert str(art) in str(ei.value)


def test_flipped_data_byte_caught_by_checksum(art):
    data = bytearray(art.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len + 5] ^= 0x01  # inside the first tensor's bytes: still parses
    art.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="checksum") as ei:
        load_artifact(art, KEY)
    assert str(art) in str(ei.value)


def test_edited_header_caught(art):
    data = art.read_bytes()
    edited = data.replace(KEY.settings.encode(), b"t" * 64, 1)  # same length: still parses
    assert edited != data
    art.write_bytes(edited)
    with pytest.raises(CorruptArtifactError, match="checksum"):
        load_artifact(art)


def test_garbage_file(tmp_path):
    p = tmp_path / "g.safetensors"
    p.write_bytes(os.urandom(300))
    with pytest.raises(CorruptArtifactError, match="g.safetensors"):
        load_artifact(p, KEY)
    p.write_text("hello world, not a tensor file\n")
    with pytest.raises(CorruptArtifactError):
        load_artifact(p, KEY)


def test_plain_safetensors_without_header_refused(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(p))
    with pytest.raises(CorruptArtifactError, match="not an msif-lite artifact"):
        load_artifact(p)


def test_unknown_format_version(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "FORMAT_VERSION", "999")
    p = save_artifact(tmp_path / "v.safetensors", {"w": torch.ones(2)}, KEY)
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="format '999'"):
        load_artifact(p, KEY)


class _Boom:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))  # runs only if someone unpickles this


def test_pickle_files_refused_without_unpickling(tmp_path):
    for i, dump in enumerate(
        [lambda o, p: torch.save(o, p), lambda o, p: p.write_bytes(pickle.dumps(o))]
    ):
        marker = tmp_path / f"UNPICKLED{i}"
        p = tmp_path / f"evil{i}.safetensors"
        dump({"w": torch.ones(2), "x": _Boom(str(marker))}, p)
        with pytest.raises(CorruptArtifactError):
            load_artifact(p)
        assert not marker.exists()


# ---------------------------------------------------------------- atomicity
def _no_temp_files(d) -> bool:
    return not [f for f in os.listdir(d) if f.endswith(".tmp")]


def test_interrupted_replace_leaves_old_artifact(art, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk yanked")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="disk yanked"):
        save_artifact(art, {"w": torch.zeros(3)}, dataclasses.replace(KEY, data="z" * 64))
    monkeypatch.undo()
    out, meta = load_artifact(art, KEY)  # old one intact
    assert torch.equal(out["f32"], _tensors()["f32"]) and meta == {"n": 3}
    assert _no_temp_files(art.parent)


def test_interrupted_mid_write_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "new" / "x.safetensors"
    real_save = storage._st_save_file

    def half_then_ctrl_c(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the write got half way
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt  # Ctrl-C in the middle of the write

    monkeypatch.setattr(storage, "_st_save_file", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(target, _tensors(), KEY)
    monkeypatch.undo()
    assert not target.exists()
    assert os.listdir(target.parent) == []
    with pytest.raises(FileNotFoundError):
        load_artifact(target, KEY)


def test_atomic_write_text_and_json(tmp_path, monkeypatch):
    p = atomic_write_text(tmp_path / "d" / "r.md", "# hi\n")
    assert p.read_text() == "# hi\n"
    q = atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [1.5, None]})
    assert q.read_text().startswith("{") and '"a"' in q.read_text()
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        atomic_write_text(p, "new text")
    monkeypatch.undo()
    assert p.read_text() == "# hi\n" and _no_temp_files(p.parent)


# ---------------------------------------------------------------- cached
def test_cached_computes_once_then_loads_and_recomputes_on_change(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.full((2, 2), float(len(calls)))}, {"run": len(calls)}

    p = tmp_path / "c.safetensors"
    t1, m1 = cached(p, KEY, compute)
    t2, m2 = cached(p, KEY, compute)
    assert len(calls) == 1 and m1 == m2 == {"run": 1} and torch.equal(t1["w"], t2["w"])

    new_key = dataclasses.replace(KEY, model="n" * 64)
    with caplog.at_level("WARNING", logger="msif_lite.engine.storage"):
        t3, m3 = cached(p, new_key, compute)
    assert len(calls) == 2 and m3 == {"run": 2} and "model fingerprint differs" in caplog.text
    assert load_artifact(p, new_key)[1] == {"run": 2}  # overwritten with the new key
    cached(p, new_key, compute)
    assert len(calls) == 2
    cached(p, new_key, compute, refresh=True)
    assert len(calls) == 3


def test_cached_recomputes_corrupt(tmp_path):
    p = tmp_path / "c.safetensors"
    p.write_bytes(b"\x00garbage")
    out, meta = cached(p, KEY, lambda: ({"w": torch.ones(1)}, {}))
    assert torch.equal(out["w"], torch.ones(1))
    assert torch.equal(load_artifact(p, KEY)[0]["w"], torch.ones(1))


def test_save_writes_from_the_tensors_memory(tmp_path):
    """save_artifact never builds the file as Python bytes (safetensors' save_file writes
    from the tensors' own memory): saving 64 MB allocates < 8 MB in Python (tracemalloc);
    the file reads back equal."""
    import tracemalloc

    big = {"w": torch.randn(4096, 4096)}  # 64 MB
    tracemalloc.start()
    try:
        save_artifact(tmp_path / "big.safetensors", big, KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, peak
    back, _ = load_artifact(tmp_path / "big.safetensors", KEY)
    assert torch.equal(back["w"], big["w"])
