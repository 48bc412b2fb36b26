"""`msif-lite`: the kit's command line.

    msif-lite trace "Where was Ludrur Draethund born?"     # the main job
    msif-lite trace "..." --json --method single_stage -k 5
    msif-lite trace "..." --compare bm25                    # a second ranking beside the first
    msif-lite trace --pretrained DIR_OR_HUB_ID --finetuned DIR_OR_HUB_ID \\
        --corpus docs.jsonl --finetune-data ft.jsonl --alpha 1e-3 "Where was Ada born?"
    msif-lite bench --help                                  # the benchmarks (msif_lite/bench)
    msif-lite bench accuracy --queries 3                    # one of them, with its own options
    msif-lite methods                                       # the registered methods
    msif-lite world --preset ci-fast --out runs/ci-fast     # generate, tokenize, train

Offline by default: nothing is fetched from a model hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from msif_lite.attribution.chat import CHAT, chat_prompt_template
from msif_lite.attribution.config import AttributionConfig
from msif_lite.attribution.measured import real_lm_lines
from msif_lite.attribution.methods import METHODS, describe_methods
from msif_lite.config import add_config_options, config_kwargs, trim_allocator
from msif_lite.engine.curvature import CURVATURES
from msif_lite.engine.factors import FactorConfig
from msif_lite.engine.prompts import DEFAULT_TEMPLATE


class _BenchHelp(argparse.HelpFormatter):
    """`msif-lite bench`'s help ends with the benchmarks `msif_lite.bench.discover` finds
    (imported only when the help is shown, not for every command)."""

    def format_help(self) -> str:
        import textwrap

        from msif_lite.bench import discover

        listing = "".join(textwrap.fill(b.help, self._width, initial_indent=f"  {n:<20} ",
                                        subsequent_indent=" " * 23) + "\n"
                          for n, b in discover().items())  # fmt: skip
        return super().format_help() + "\nbenchmarks:\n" + listing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msif-lite", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "trace", help="attribute the fine-tuned model's answer to documents",
        description="Rank pre-training documents by their influence on the fine-tuned model's "
                    "answer. Each hit shows the part of the document that carries its score "
                    "(the sentence with the most per-token score; for text methods the "
                    "sentence sharing most words with the question and answer). On the kit's "
                    "world the output ends with what the kit measured about the method "
                    "against retraining (results/variants.json, results/lds.json).")
    t.add_argument("question", help="a question, e.g. 'Where was Ludrur Draethund born?'")
    t.add_argument("--answer", help="attribute this answer instead of the model's own")
    t.add_argument("-k", type=int, default=10, help="documents to print (default 10)")
    t.add_argument("--candidates", type=int, default=100,
                   help="documents pre-selected by embedding similarity (default 100)")
    t.add_argument("--method", default="multi_stage", choices=list(METHODS), metavar="METHOD",
                   help="a registered method (default multi_stage; `msif-lite methods` "
                        f"lists them): {', '.join(METHODS)}")  # fmt: skip
    t.add_argument("--compare", metavar="METHOD", choices=list(METHODS),
                   help="also rank the same candidates with this method and print it below, "
                        "e.g. --compare bm25 or --compare multi_stage_token_positive")
    t.add_argument("--json", action="store_true",
                   help="print the hits as JSON (each with its evidence text)")
    t.add_argument("--mlp-only", action="store_true", help="track MLP layers only")
    t.add_argument("--layers", metavar="REGEX", action="append",
                   help="track only layers whose name matches this regex (repeatable), e.g. "
                        "'layers\\.2[6-9]\\.mlp\\.' for the MLPs of the last 4 of 30 blocks")
    t.add_argument("--preset", default="default", help="shipped world/checkpoints to use")
    t.add_argument("--world", help="world directory (default data/world/<preset>)")
    t.add_argument("--checkpoints", help="directory with the kit's pretrained/ and finetuned/")
    own = t.add_argument_group(
        "your own model pair (instead of the shipped world; any Hugging Face causal LM)")
    own.add_argument("--pretrained", metavar="DIR_OR_HUB_ID",
                     help="θ_pt: a save_pretrained directory or a hub id (cached locally)")
    own.add_argument("--finetuned", metavar="DIR_OR_HUB_ID", help="θ_ft, the fine-tune of it")
    own.add_argument("--corpus", metavar="FILE",
                     help="pre-training documents: .jsonl with 'id' and 'text' per line, or "
                          "plain text (one document per blank-line-separated paragraph)")
    own.add_argument("--finetune-data", metavar="FILE",
                     help=".jsonl with 'prompt' and 'answer' per line (fits H_ft)")
    own.add_argument("--real", metavar="PRESET",
                     help="the kit's real pair instead: SmolLM2-135M-Instruct (a 4-bit GGUF "
                          "approximation, `scale.real_lm`) continued-pre-trained and fine-tuned "
                          "on data/real_lm by `world.real_pipeline` preset PRESET ('lab': 96 "
                          "documents, ~3 min once; 'cpu': 218, ~9 min), trained once and "
                          "cached; sets --pretrained, --finetuned, --corpus and --finetune-data")
    own.add_argument("--template", default=DEFAULT_TEMPLATE.describe()[1:-1],
                     help="default '%(default)s' (the kit's plain QA template, which its "
                          "fine-tunes use, also on an instruct model): how questions and "
                          "answers were joined in fine-tuning, for H_ft and the query alike; "
                          "\\n is a newline. 'chat': the tokenizer's chat template "
                          "(apply_chat_template), for a pair fine-tuned in that format. The "
                          "output says which template is used; retrieval matches the bare "
                          "question either way")
    settings = t.add_argument_group(
        "attribution settings (AttributionConfig; --alpha is for your own pair, required "
        "unless the fine-tuned directory records it; longer documents are split into chunks "
        "doc#1, doc#2, … of --context-length tokens)")
    add_config_options(settings, AttributionConfig, choices={"curvature": list(CURVATURES)})
    add_config_options(settings, FactorConfig)
    t.add_argument("--device", default="cpu",
                   help="where the models run: cpu (default), cuda, cuda:1, … or auto (the "
                        "first CUDA GPU if there is one, msif_lite.device())")
    t.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("methods", help="list the registered attribution methods")

    b = sub.add_parser("bench", help="run a benchmark (writes results/<name>.json and .md)",
                       formatter_class=_BenchHelp)
    b.add_argument("name", metavar="NAME", help="a benchmark (listed below)")
    b.add_argument("args", nargs=argparse.REMAINDER,
                   help="passed to the benchmark (`msif-lite bench NAME --help`)")

    w = sub.add_parser("world", help="generate the world and train both stages")
    w.add_argument("args", nargs=argparse.REMAINDER,
                   help="see python -m msif_lite.world.training -h")
    return p


OWN_PAIR = ("pretrained", "finetuned", "corpus", "finetune_data")


def _device(name: str):
    """`--device`: 'auto' is msif_lite.device(); anything else a torch device name."""
    import torch

    from msif_lite.config import device

    if name == "auto":
        return device()
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda, cuda:1 or auto"
                         ) from e  # fmt: skip
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here; use --device cpu")
    return dev


def _own_pair(a: argparse.Namespace, cfg, chat: bool = False):
    """The Attributor and notes for `--pretrained … --finetuned … --corpus … --finetune-data`;
    `chat`: encode with the tokenizer's chat template (`--template chat`)."""
    from msif_lite.attribution.attributor import Attributor
    from msif_lite.attribution.checks import context_length
    from msif_lite.scale.pairs import (
        chunk_documents,
        load_model_pair,
        read_documents,
        read_pairs,
        recorded_alpha,
    )

    missing = [f"--{n.replace('_', '-')}" for n in OWN_PAIR if getattr(a, n) is None]
    if missing:
        raise ValueError(f"your own pair needs {', '.join(missing)} as well: --pretrained, "
                         "--finetuned, --corpus and --finetune-data go together")  # fmt: skip
    if a.world or a.checkpoints:
        raise ValueError("--world / --checkpoints are for the kit's own checkpoints; leave "
                         "them out with --pretrained / --finetuned")  # fmt: skip
    alpha, source = a.alpha, "--alpha"
    if alpha is None:
        alpha, source = recorded_alpha(a.finetuned), f"recorded in {a.finetuned}"
    if alpha is None:
        raise ValueError(
            f"α is unknown for {a.finetuned}: pass --alpha A, the proximity strength "
            "(α/2)‖θ − θ_pt‖² the fine-tune was trained with (the kit's checkpoints record it "
            "in msif_meta.json). A fine-tune without a proximity term has no α of its own: "
            "α then only regularises (H_ft + αI); try --alpha 1e-3 and compare the ranking "
            "at 1e-2 and 1e-4.")
    if a.quiet or a.json:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    pair = load_model_pair(a.pretrained, a.finetuned, device=_device(a.device))
    if chat:
        cfg = replace(cfg, template=chat_prompt_template(pair.tokenizer))
    n_ctx, ctx_source = context_length(pair.pretrained, pair.tokenizer, a.context_length)
    docs = read_documents(a.corpus)
    docs, report = chunk_documents(docs, pair.tokenizer, n_ctx)
    pairs = read_pairs(a.finetune_data)
    notes = [f"models: {pair.describe()}",
             f"corpus: {report.n_documents} documents from {a.corpus}; {report} "
             f"(context from {ctx_source})",
             f"fine-tuning data: {len(pairs)} pairs from {a.finetune_data}, template "
             f"{cfg.template.describe()}",
             f"alpha = {alpha:g} ({source})", ""]  # fmt: skip
    att = Attributor(pair.pretrained, pair.finetuned, pair.tokenizer, docs, pairs, cfg,
                     alpha=alpha)  # fmt: skip
    return att, notes


def _config(a: argparse.Namespace) -> tuple[AttributionConfig, bool]:
    """The AttributionConfig (and its FactorConfig) `trace`'s options describe, and whether
    --template asks for the tokenizer's chat template (resolved once the tokenizer is loaded)."""
    from msif_lite.engine.prompts import PromptTemplate

    chat = a.template.strip() == CHAT
    template = DEFAULT_TEMPLATE if chat else PromptTemplate.parse(
        a.template.replace("\\n", "\n").replace("\\t", "\t"))
    given = config_kwargs(AttributionConfig, a)
    given.pop("alpha", None)  # resolved with the checkpoint's record (_own_pair)
    factors = FactorConfig(include=_include(a.layers, a.mlp_only),
                           **config_kwargs(FactorConfig, a))  # fmt: skip
    cfg = AttributionConfig(factors=factors, progress=not (a.quiet or a.json),
                            template=template, **given)  # fmt: skip
    return cfg, chat


def pair_attributor(argv: Sequence[str]):
    """(Attributor, notes, args) of `msif-lite trace ARGV` for --real or your own pair: the
    very objects the command builds (`msif-lite bench trace-speed` times them)."""
    a = _parser().parse_args(["trace", *argv])
    cfg, chat = _config(a)
    if a.real:
        _real_pair(a)
    att, notes = _own_pair(a, cfg, chat)
    return att, notes, a


def _trace(a: argparse.Namespace) -> int:
    from msif_lite.attribution.trace import trace, trace_attributor
    from msif_lite.world.shipped import load_shipped

    cfg, chat = _config(a)
    if a.real:
        _real_pair(a)
    if any(getattr(a, n) is not None for n in OWN_PAIR):
        att, notes = _own_pair(a, cfg, chat)
        result = trace_attributor(att, a.question, answer=a.answer, k=a.k,
                                  n_candidates=a.candidates, method=a.method, notes=notes,
                                  compare=a.compare, truth=_real_truth(a))  # fmt: skip
        if a.real:
            result.measured = real_lm_lines(a.method, preset=a.real)
    else:
        if a.alpha is not None:
            raise ValueError("--alpha is for your own pair (--pretrained …); the kit's "
                             "checkpoints record the α they were fine-tuned with")  # fmt: skip
        shipped = load_shipped(a.preset, world_dir=a.world, checkpoint_dir=a.checkpoints)
        if chat:
            cfg = replace(cfg, template=chat_prompt_template(shipped.tokenizer))
        dev = _device(a.device)
        shipped.pretrained.to(dev)
        shipped.finetuned.to(dev)
        result = trace(shipped, a.question, answer=a.answer, k=a.k, n_candidates=a.candidates,
                       method=a.method, config=cfg, compare=a.compare)  # fmt: skip
    if a.json:
        if result.notes or result.measured:
            print("\n".join(n for n in result.notes + result.measured if n), file=sys.stderr)
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(result.as_text())
    return 0


def _bench(parser: argparse.ArgumentParser, name: str, args: list[str]) -> int:
    """`msif-lite bench NAME ARGS`: the discovered benchmark's main (a BenchResult) → 0."""
    from msif_lite.bench import discover
    from msif_lite.bench.common import BenchResult

    benches = discover()
    if name not in benches:
        parser.error(f"no benchmark {name!r}: one of {', '.join(benches)} "
                     "(`msif-lite bench --help`)")  # fmt: skip
    result = benches[name].main(args)
    if not isinstance(result, BenchResult):
        raise TypeError(f"benchmark {name!r} returned {type(result).__name__}, not a "
                        "BenchResult (msif_lite/bench/common.py)")  # fmt: skip
    return 0


def _real_pair(a: argparse.Namespace) -> None:
    """--real PRESET: train (once) and point the own-pair options at the real pair's run."""
    from msif_lite.scale.real_lm import smollm2_folder
    from msif_lite.world.real_pipeline import build_real_pipeline

    if any(getattr(a, n) is not None for n in OWN_PAIR):
        raise SystemExit("--real sets the pair and its data: drop --pretrained, --finetuned, "
                         "--corpus and --finetune-data, or drop --real")
    root = build_real_pipeline(smollm2_folder(), a.real, progress=not a.quiet)
    a.pretrained, a.finetuned = (str(root / "checkpoints" / s) for s in ("pretrained",
                                                                          "finetuned"))
    a.corpus, a.finetune_data = (str(root / "world" / f) for f in ("documents.jsonl",
                                                                   "finetune.jsonl"))


def _real_truth(a: argparse.Namespace):
    """--real: the true sources of a held-out or fine-tuning question of the real world."""
    if not a.real:
        return None
    from msif_lite.world.real_text import load_real_world

    world = load_real_world(Path(a.corpus).parent)
    sources = {f.fact_id: set(f.source_doc_ids) for f in world.facts}
    by_prompt = {q.prompt.strip(): sources[q.fact_id] for q in [*world.heldout, *world.finetune]}
    return lambda prompt: by_prompt.get(prompt.strip())


def _include(layers: list[str] | None, mlp_only: bool) -> str | tuple[str, ...] | None:
    """FactorConfig.include for --layers (regexes) or --mlp-only (the 'mlp' shortcut)."""
    if layers and mlp_only:
        raise SystemExit("give --layers or --mlp-only, not both: put the MLP in the regex, "
                         "e.g. --layers 'layers\\.2[6-9]\\.mlp\\.'")
    return tuple(layers) if layers else ("mlp" if mlp_only else None)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    trim_allocator()  # freed tensors go back to the system: the memory plan's assumption
    parser = _parser()
    a, extra = parser.parse_known_args(argv)
    if extra and a.command not in ("bench", "world"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        a.args = extra + list(a.args)  # `world --preset X`: options before any positional
    try:
        if a.command == "trace":
            return _trace(a)
        if a.command == "methods":
            print(describe_methods())
            return 0
        if a.command == "bench":
            return _bench(parser, a.name, a.args)
        if a.command == "world":
            from msif_lite.world.training import main as world_main

            world_main(a.args)
            return 0
    except (ValueError, TypeError, FileNotFoundError, KeyError) as e:  # user errors: no traceback
        print(f"msif-lite: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
