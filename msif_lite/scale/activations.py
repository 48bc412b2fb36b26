"""act(B, T): the activation bytes of one batch's capture, measured from the model itself.

One batch's forward + backward to the tracked layers' outputs with the captures (ā, Ds) kept,
i.e. the peak of `capture_batch`, is measured (`measure.measure_peak`) on copies of the same
config (class, width, heads, intermediate size, vocabulary, attention implementation) at the
model's own depth — or, above CALIBRATION['params'] parameters, at two smaller depths with
the vocabulary scaled alike, extrapolated linearly in L — at B ∈ {1, 2}, T ∈ {32, 128}, and
fitted to
    act(B, T) = B·T·k_1 + B·T²·k_2 + k_0,
so every architecture (BLOOM, Llama, GPT-2, GPT-NeoX, …) gets its own coefficients. Measured
on the CPU: on a GPU, fused attention kernels have no T² term, so the plan is conservative
there. Used by `memory.predict` (Notebook 09 §Memory before each stage).
"""

from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass

import torch

from msif_lite.engine.layers import find_modules
from msif_lite.scale.measure import measure_peak

CALIBRATION = {"seq_len": (32, 128), "points": ((1, 1), (1, 2), (2, 1), (2, 2)),
               "params": 60_000_000}  # (B, T index) points; largest copy measured


@dataclass(frozen=True)
class ActivationModel:
    """act(B, T) = B·T·k_1(L) + B·T²·k_2(L) + k_0(L) bytes (module docstring): fitted on
    measured peaks of `capture_batch` on copies of the model at its own width, at depths
    `depths` (with the vocabulary scaled alike; k linear in L between and beyond them)."""

    depths: tuple[int, ...]
    coef: tuple[tuple[float, float, float], ...]  # (k_1, k_2, k_0) per depth
    residual: float  # max relative error of the fit on its own calibration points
    source: str

    def __call__(self, b: int, t: int, n_layers: int, vocab: int | None = None) -> float:
        if len(self.depths) == 1:
            k1, k2, k0 = self.coef[0]
        else:
            (l1, l2), (c1, c2) = self.depths, self.coef
            w = (n_layers - l1) / (l2 - l1)
            k1, k2, k0 = (x + w * (y - x) for x, y in zip(c1, c2))
        return max(0.0, b * t * k1 + b * t * t * k2 + k0)


def _layer_count_key(config) -> str:
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, k):
            return k
    raise ValueError(f"{type(config).__name__} has no layer count (num_hidden_layers / n_layer)")


def copy_config(config, n_layers: int | None = None):
    """An independent copy of a transformers config (attention implementation kept), with
    `n_layers` blocks if given."""
    cfg = type(config).from_dict(config.to_dict())
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None:
        with contextlib.suppress(AttributeError, ValueError):
            cfg._attn_implementation = impl
    if n_layers is not None:
        setattr(cfg, _layer_count_key(config), n_layers)
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:n_layers]
    return cfg


def _calibration_depths(config) -> tuple[tuple[int, int], ...]:
    """(depth, vocabulary) of the copies measured: the model itself when it has at most
    CALIBRATION['params'] parameters, else two copies with depth and vocabulary both scaled
    by f = l/L (l and l/2 blocks), so the per-token terms keep their ratio (and the same
    phase of the pass peaks); k is then linear in f and extrapolated to f = 1."""
    from transformers import AutoModelForCausalLM

    def n_params(n, v):
        cfg = copy_config(config, n)
        cfg.vocab_size = v
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(cfg)
        return sum(p.numel() for p in m.parameters())

    L, V = getattr(config, _layer_count_key(config)), config.vocab_size
    base, per_layer = n_params(1, 1024), n_params(2, 1024) - n_params(1, 1024)
    per_vocab = (n_params(1, 2048) - base) / 1024
    size = lambda n: base + (n - 1) * per_layer + per_vocab * (V * n / L - 1024)  # noqa: E731
    if size(L) <= CALIBRATION["params"]:
        return ((L, V),)
    n = max((k for k in range(2, L) if size(k) <= CALIBRATION["params"]), default=2)
    return tuple((k, max(64, round(V * k / L))) for k in (n // 2, n))


@functools.lru_cache(maxsize=32)
def _calibrate(config_json: str, config_cls: type, include, exclude, autocast: str | None,
               factor_dtype: str, weight_dtype: str, progress: bool = True
               ) -> tuple[ActivationModel, ActivationModel]:  # fmt: skip
    """(fitting, scoring) activation models of one config (see `activation_model`);
    `progress`: a bar over the measured passes (shown after 2 s)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    from msif_lite.engine.capture import capture_batch
    from msif_lite.engine.tasks import LanguageModelingTask, TokenBatch

    d = json.loads(config_json)
    config = config_cls.from_dict(d)
    if d.get("_attn_implementation_internal"):
        with contextlib.suppress(AttributeError, ValueError):
            config._attn_implementation = d["_attn_implementation_internal"]
    task = LanguageModelingTask()
    (t1, t2), points = CALIBRATION["seq_len"], CALIBRATION["points"]
    copies = _calibration_depths(config)
    modes = {"fitting": (autocast, "sampled", factor_dtype), "scoring": (None, "empirical",
                                                                         weight_dtype)}  # fmt: skip
    coef: dict[str, list] = {k: [] for k in modes}
    resid = dict.fromkeys(modes, 0.0)
    bar = tqdm(total=len(copies) * len(modes) * len(points), disable=not progress, delay=2.0,
               desc="memory plan: measuring activations")  # fmt: skip
    for depth, vocab in copies:
        torch.manual_seed(0)
        cfg = copy_config(config, depth)
        cfg.vocab_size = vocab
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(getattr(cfg, k, None), int) and getattr(cfg, k) >= vocab:
                setattr(cfg, k, vocab - 1)
        model = AutoModelForCausalLM.from_config(cfg).to(getattr(torch, weight_dtype)).eval()
        try:
            mods = find_modules(model, include, exclude)
        except ValueError as e:  # a block index the shallower copy does not have
            raise ValueError(
                f"the memory plan measures activations on copies of the model {depth} blocks "
                f"deep ({', '.join(str(c[0]) for c in copies)} of "
                f"{getattr(config, _layer_count_key(config))}), and "
                f"include={include!r} selects no layer there ({e}). Plan with layers that exist "
                f"in every copy (e.g. as many layers of the same kind in the first blocks, or "
                "'mlp'): every block has the same shapes, so the plan depends on the tracked "
                "layers' kind and number, hardly on their depth") from e
        for mode, (cast, fisher, cap_dtype) in modes.items():
            rows, ys = [], []
            for b, t in [(b, {1: t1, 2: t2}[i]) for b, i in points]:
                ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(t))
                batch = TokenBatch(ids, torch.ones_like(ids), ids.clone())

                def run(batch=batch, cast=cast, fisher=fisher, cap_dtype=cap_dtype, model=model,
                        mods=mods):
                    ctx = (torch.autocast("cpu", dtype=getattr(torch, cast)) if cast
                           else contextlib.nullcontext())  # fmt: skip
                    with ctx:
                        return capture_batch(model, task, batch, mods, fisher=fisher,
                                             generator=torch.Generator().manual_seed(1),
                                             dtype=getattr(torch, cap_dtype))  # fmt: skip

                run()  # warm-up: lazily created kernels and caches are not activations
                rows.append([b * t, b * t * t, 1.0])
                ys.append(float(measure_peak(run)[0]))
                bar.update()
            x, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
            c = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
            if c[1] < 0:  # no negative T² term (it would dominate at long T): refit without
                c = torch.linalg.lstsq(x[:, [0, 2]], y[:, None]).solution[:, 0]
                c = torch.stack([c[0], torch.zeros((), dtype=c.dtype), c[1]])
            coef[mode].append(tuple(float(v) for v in c))
            resid[mode] = max(resid[mode], float(((x @ c - y).abs() / y).max()))
        del model
    bar.close()
    depths = tuple(d for d, _ in copies)
    return tuple(ActivationModel(depths, tuple(coef[m]), resid[m], (
        f"measured: capture_batch peaks of copies of width {getattr(config, 'hidden_size', '?')}"
        f" with (depth, vocabulary) {copies}, (B, T) in {points} with T {t1}/{t2}; "
        f"{modes[m][1]} labels, autocast {modes[m][0]}, captures {modes[m][2]}"))
        for m in modes)  # type: ignore[return-value]


def activation_model(config, options, *, fitting: bool, weight_dtype: torch.dtype = torch.float32,
                     progress: bool = True) -> ActivationModel:  # fmt: skip
    """The act(B, T) of `config` for the fitting passes (sampled labels, autocast, captures in
    the factor dtype) or for scoring (data labels, no autocast, captures in the weights'
    dtype), measured once per config on the CPU and cached (module docstring).

    Why measured and not derived from the config by formula: which tensors autograd saves
    (attention implementation, activation function, norms, casts under autocast, the
    sampled-label softmax) differs between architectures and library versions; a peak is a
    maximum over the phases of a pass, so only a run of the same code finds it. Copies at
    the model's own width, with depth and vocabulary scaled by the same f ≤ 1 (f = 1 up to
    CALIBRATION['params'] parameters), keep the ratio of the per-token terms, so the phase
    that peaks is the same; B and T are small, and peak = B·T·k_1 + B·T²·k_2 + k_0 holds up
    to the fit residual. Not covered: kernels that behave differently at large T (a GPU's
    fused attention: no T² term, so the plan is conservative there)."""
    d = config.to_dict()
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None:
        d["_attn_implementation_internal"] = impl
    js = json.dumps(d, sort_keys=True, default=str)
    norm = lambda p: tuple(p) if isinstance(p, list | tuple) else p  # noqa: E731
    fit, score = _calibrate(js, type(config), norm(options.include), norm(options.exclude),
                            options.autocast_dtype, options.factor_dtype_for(weight_dtype),
                            str(weight_dtype).removeprefix("torch."), progress)  # fmt: skip
    return fit if fitting else score

