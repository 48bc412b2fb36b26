"""How fast is the exact GGN-vector product that every ground truth in the kit is built on?

Seconds per G·v product per right-hand side (RHS) and per 1k tokens, for K RHS at once, on
a shipped model with G over `--docs` documents, in one run, for three variants:

- `before`: float64 model, one product recomputes every batch's primal pass (the
  implementation the 64-document Exp 1 ground truth used, `results/accuracy_64docs.md`);
- `float64_cached`: float64, each batch's primal pass and vjp closure kept across calls
  (`cache=True`), documents batched by length;
- `float32_cached`: as float64_cached with float32 products (`dtype=torch.float32`); the
  output Hessian still by jvp-of-grad of the loss;
- `closed_form`: as float32_cached with the closed-form softmax cross-entropy output
  Hessian H u = p ⊙ u − p (pᵀu) per token (`analytic=True`) on the logits;
- `after`: as closed_form, linearised to the input h of the untracked output layer with
  H̃ = Wᵀ H W per token (`through_head`, the default where it is cheaper): no product
  touches the V-sized logits. What `msif-lite bench accuracy` uses (its CG recurrences and
  residual checks stay float64).

Each timing is the best of `--repeats` calls after one warm-up call; `rel_err_vs_before`
is ‖Gv − Gv_before‖ / ‖Gv_before‖ over the K RHS. Run: `msif-lite bench exact-speed
[--presets paper-toy default lds] [--out results]`; writes <out>/exact_speed.{json,md}.
(paper-toy, the paper's Exp 1 shape, is trained once into .cache/trained/ if absent.)
"""

from __future__ import annotations

import argparse
import copy
import random
from collections.abc import Sequence

import torch
from torch.func import functional_call, jvp, vjp, vmap
from torch.utils.flop_counter import FlopCounterMode

from msif_lite.attribution.encoder import Encoder
from msif_lite.bench import common
from msif_lite.config import pick
from msif_lite.engine import exact, exact_products
from msif_lite.engine.exact import ggn_matvec
from msif_lite.engine.layers import find_modules
from msif_lite.engine.tasks import LanguageModelingTask
from msif_lite.world.shipped import load_shipped, trained_pipeline

VARIANTS = {  # name: (product dtype, cache, batch by length, closed-form H_out, through head)
    "before": (torch.float64, False, False, False, False),
    "float64_cached": (torch.float64, True, True, False, False),
    "float32_cached": (torch.float32, True, True, False, False),
    "closed_form": (torch.float32, True, True, True, False),
    "after": (torch.float32, True, True, True, True),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="msif-lite bench exact-speed",
                                description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=pick(["paper-toy", "default", "lds"], ["lds"]),
                   help="shipped pipelines (data/checkpoints/<preset>)")
    p.add_argument("--docs", type=int, default=pick(64, 8), help="documents G is over")
    p.add_argument("--rhs", type=int, nargs="+", default=pick([1, 10], [1, 3]),
                   help="numbers K of right-hand sides per product")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--repeats", type=int, default=pick(3, 1))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    p.add_argument("--note", action="append", default=[], help="a remark for the markdown")
    return p.parse_args(argv)


def batches_of(shipped, n_docs: int, batch_size: int, seed: int, by_length: bool) -> list:
    """The same seeded documents as `bench accuracy --fit n_docs`, batched (by length or not)."""
    w = shipped.world
    enc = Encoder.for_model(shipped.pretrained, shipped.tokenizer)
    texts = {d.doc_id: d.text for d in w.documents}
    ids = random.Random(seed).sample(sorted(texts), n_docs)
    cands = [enc.document(d, texts[d]) for d in ids]
    if by_length:
        cands.sort(key=lambda c: len(c.input_ids))
    return [enc.collate(cands[i : i + batch_size]) for i in range(0, len(cands), batch_size)]


def time_variant(model, batches, modules, v: torch.Tensor, dtype, cache: bool, repeats: int,
                 analytic: bool = True, through_head: bool = False):  # fmt: skip
    """(best seconds per call, the product, peak MiB) of one G·v variant."""
    mv = ggn_matvec(model, LanguageModelingTask(), batches, modules, dtype=dtype, cache=cache,
                    analytic=analytic, through_head=through_head)  # fmt: skip
    with common.PeakMemory() as mem:
        out = mv(v)  # warm-up (fills the cache)
        best = float("inf")
        for _ in range(repeats):
            with common.Timer() as t:
                mv(v)
            best = min(best, t.seconds)
    return best, out, mem.peak_mb


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        with common.Timer() as t:
            fn()
        best = min(best, t.seconds)
    return best


def matmul_gflops(dtype: torch.dtype, repeats: int = 10) -> float:
    """The machine's dense matmul rate (GFLOP/s) on a (4000, 128) @ (128, 512) product, a
    typical shape of the products (tokens × hidden @ hidden × MLP width)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 128, generator=g, dtype=dtype)
    b = torch.randn(128, 512, generator=g, dtype=dtype)
    return 2 * 4000 * 128 * 512 / _best(lambda: a @ b, repeats) / 1e9


def product_flops(mv, v: torch.Tensor) -> float:
    """FLOPs of one call of the G·v product `mv` (torch's FlopCounterMode: matmuls, bmm, SDPA),
    after a first call (which builds what a cached product keeps: its primal passes, H̃)."""
    mv(v)
    with FlopCounterMode(display=False) as fc:
        mv(v)
    return float(fc.get_total_flops())


def parts(model, batches, modules, k: int, repeats: int) -> dict[str, float]:
    """Seconds of the pieces of one `after` product for k RHS, summed over the batches: the
    primal forward (one pass, what jvp recomputes), the vmapped jvp J·v (primal included),
    the pulled-back output Hessian H̃ u and the vmapped vjp Jᵀ·u (closure cached)."""
    task = LanguageModelingTask()
    m32, head = exact_products._through_head(copy.deepcopy(model).float(), task, batches,
                                    exact.modules_of(model, modules), True, True, True)
    mods = exact.modules_of(m32, modules)
    wrapped, p0 = exact.OutputOf(m32, task), exact.tracked_params(mods)
    p = sum(m.numel for m in mods)
    tangents = exact.to_params(torch.randn(k, p, generator=torch.Generator().manual_seed(0)),
                                mods)  # fmt: skip
    out = dict.fromkeys(("forward", "jvp", "output_hessian", "vjp"), 0.0)
    with exact.math_sdpa(), torch.no_grad():
        for batch in batches:
            f = lambda q, batch=batch: functional_call(wrapped, q, (batch,))  # noqa: E731
            h, vjp_fn = vjp(f, p0)
            hess = exact.pulled_back_hessian(task.output_hessian_product(head(h), batch),
                                             head.weight.detach(), h.shape[:-1])  # fmt: skip
            jv = vmap(lambda t, f=f: jvp(f, (p0,), (t,))[1])(tangents)
            hu = hess(jv)
            out["forward"] += _best(lambda f=f: f(p0), repeats)
            out["jvp"] += _best(lambda f=f: vmap(lambda t: jvp(f, (p0,), (t,))[1])(tangents),
                                repeats)  # fmt: skip
            out["output_hessian"] += _best(lambda h=hess, u=jv: h(u), repeats)
            out["vjp"] += _best(lambda g=vjp_fn, u=hu: vmap(g)(u), repeats)
    return out


def measure(preset: str, args: argparse.Namespace) -> list[dict]:
    world, ckpt = trained_pipeline(preset)
    shipped = load_shipped(preset, world_dir=world, checkpoint_dir=ckpt)
    model = shipped.pretrained.double().eval()
    modules = find_modules(model)
    p = sum(m.numel for m in modules)
    rows = []
    for k in args.rhs:
        v = torch.randn(k, p, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        ref = None
        for name, (dtype, cache, by_length, analytic, head) in VARIANTS.items():
            b = batches_of(shipped, args.docs, args.batch_size, args.seed, by_length)
            tokens = sum(int(x.attention_mask.sum()) for x in b)
            s, out, mb = time_variant(model, b, modules, v, dtype, cache, args.repeats, analytic,
                                      head)  # fmt: skip
            mv = ggn_matvec(model, LanguageModelingTask(), b, modules, dtype=dtype,
                            cache=cache, analytic=analytic, through_head=head)  # fmt: skip
            flops = product_flops(mv, v)
            ref = out if ref is None else ref
            rows.append({
                "preset": preset, "model": shipped.finetuned_meta.preset, "n_params": p,
                "docs": args.docs, "tokens": tokens,
                "padded_tokens": sum(x.input_ids.numel() for x in b), "rhs": k,
                "variant": name, "s_per_product": s, "s_per_product_per_rhs": s / k,
                "s_per_product_per_rhs_per_1k_tokens": s / k / (tokens / 1000),
                "rel_err_vs_before": float((out - ref).norm() / ref.norm()),
                "peak_mem_mb": mb, "gflop_per_product": flops / 1e9,
                "gflop_per_s": flops / 1e9 / s,
            })  # fmt: skip
            print(f"  {preset} K={k} {name}: {s:.3f} s per product", flush=True)
        if k == max(args.rhs):
            b = batches_of(shipped, args.docs, args.batch_size, args.seed, True)
            split = parts(model, b, modules, k, args.repeats)
            rows[-1]["parts_s"] = split
            print(f"  {preset} K={k} after, parts: {split}", flush=True)
    base = {(r["preset"], r["rhs"]): r["s_per_product"] for r in rows if r["variant"] == "before"}
    for r in rows:
        r["speedup_vs_before"] = base[(r["preset"], r["rhs"])] / r["s_per_product"]
    return rows


def markdown(payload: dict) -> str:
    cols = ["preset", "model", "n_params", "tokens", "rhs", "variant", "s_per_product",
            "s_per_product_per_rhs", "s_per_product_per_rhs_per_1k_tokens", "speedup_vs_before",
            "rel_err_vs_before", "gflop_per_product", "gflop_per_s", "peak_mem_mb"]  # fmt: skip
    st = payload["settings"]
    lines = []
    for r in payload["rows"]:
        if "parts_s" in r:
            sp = ", ".join(f"{k} {x:.3g} s" for k, x in r["parts_s"].items())
            lines.append(f"- {r['preset']}, {r['rhs']} RHS, `after`, by piece: {sp}.")
    before = {(r["preset"], r["rhs"]): r for r in payload["rows"] if r["variant"] == "before"}
    for r in payload["rows"]:
        if r["variant"] == "after":
            floor = r["gflop_per_product"] / st["matmul_gflops_float32"]
            lines.append(
                f"- {r['preset']}, {r['rhs']} RHS: `after` does {r['gflop_per_product']:.3g} "
                f"GFLOP per product; at the float32 matmul rate "
                f"({st['matmul_gflops_float32']:.0f} GFLOP/s) that takes at least {floor:.3g} s, "
                f"so no float32 product with these FLOPs is more than "
                f"{before[(r['preset'], r['rhs'])]['s_per_product'] / floor:.2g}× faster than "
                "`before` here.")  # fmt: skip
    return (
        "# Exact GGN-vector products: seconds per product\n\n"
        f"Made by `msif-lite bench exact-speed`; {payload['settings']['threads']} torch "
        f"thread(s), best of {payload['settings']['repeats']} calls after a warm-up; G over "
        f"{payload['settings']['docs']} documents. Every row is from the same run on the same "
        "machine: compare rows with each other (the notes below say what else ran).\n\n"
        + common.markdown_table(payload["rows"], cols, floatfmt=".3g")
        + f"\nMachine: dense matmul {st['matmul_gflops_float32']:.0f} GFLOP/s in float32, "
        f"{st['matmul_gflops_float64']:.0f} GFLOP/s in float64 (one (4000,128)@(128,512) "
        "product, the same threads); GFLOP counted by torch's FlopCounterMode (matmuls).\n\n"
        + "\n".join(lines) + "\n"
        + "\nbefore: float64, primal pass recomputed per call, output Hessian by jvp-of-grad "
        "(the 64-document Exp 1 ground truth). float32_cached: float32 products, cached "
        "linearisation, documents batched by length. closed_form: as float32_cached with the "
        "closed-form output Hessian p ⊙ u − p (pᵀu) per token on the logits. after: as "
        "closed_form, linearised to the output layer's input h with H̃ = Wᵀ H W per token "
        "(`through_head`; what `bench accuracy` now uses, with float64 CG recurrences and "
        "residuals). rel_err_vs_before: relative difference of the product from `before`'s.\n"
        + "".join(f"\n{n}\n" for n in payload.get("notes", []))
    )


def main(argv: Sequence[str] | None = None) -> common.BenchResult:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [r for preset in args.presets for r in measure(preset, args)]
    payload = {"rows": rows, "settings": {"docs": args.docs, "repeats": args.repeats,
                                          "threads": args.threads, "seed": args.seed,
                                          "batch_size": args.batch_size,
                                          "matmul_gflops_float32": matmul_gflops(torch.float32),
                                          "matmul_gflops_float64": matmul_gflops(torch.float64)},
               "notes": args.note}  # fmt: skip
    return common.finish("exact_speed", payload, markdown(payload), args.out)


BENCH = common.Benchmark("exact-speed", "seconds per exact GGN-vector product, before/after "
                         "batching, float32 and the closed-form output Hessian", main)
