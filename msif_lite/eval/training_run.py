"""The training run that happened, as the unrolled methods need it (DESIGN §6): the initial
weights, the pre-training texts in training order (w_i weighs `texts[i]`), the fine-tuning
pairs, both stages' `TrainConfig`s and the proximity α. From these `eval.unrolled` replays
both stages bit-for-bit (CPU) and differentiates the measurement through every step.

`TrainingRun.from_pipeline(preset, world, tokenizer)` is the kit's shipped pipeline
(`world.training.build_world_pipeline`: `build_model(preset.model, seed)`, then `pretrain`
and `finetune` with `replace(cfg, seed=seed)`), i.e. the run behind `data/checkpoints/lds`
and `lds-hard` and the w = 1 point of the retraining ground truth (`eval.retraining`).

The fine-tune's reverse pass runs in float64 (`finetune_dtype`), replaying the fine-tune
in float64 from the float32 θ_pt: for an embedding row whose token no fine-tuning batch has
held yet, g = α(θ − θ_pt) = 0 and v = 0, where AdamW's update has slope step·(1−β₁)α/ε ≈ 50
per step (lds: lr 5e-4, α 0.01), so that row's adjoint grows ×49 per step backwards until
the step where the token first appears. Mathematically it never leaves the row (the row
has no loss gradient there, and it meets the clip factor and v only through g = 0), but in
float32 it overflows after ~22 such steps (measured on `lds`: 6e37 at fine-tune step 67)
and inf·0 = NaN then spreads to every adjoint. In float64 (≤ 49¹⁰⁰ ≈ 1e169) it stays
finite and the exact zeros keep it in its row. The float64 fine-tune departs from the
float32 one only by rounding (the pre-training replay stays float32, training.py's bits).

The run memoises, per question (prompt, answer): dm/dθ_pt (the fine-tune's reverse pass,
start and anchor moved together) and dm/dw (both stages), so the methods that share them
(`unrolled`, `unrolled_finetune_only`) compute each once. Queries are processed in blocks
of `block` per reverse pass (one replay, `block` VJPs per step).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from msif_lite.engine.tasks import LanguageModelingTask
from msif_lite.eval.unrolled import (
    Measure,
    Params,
    Trajectory,
    TwoStage,
    default_checkpoint_every,
    finetune_adjoint,
    pretrain_metagradient,
    replay,
    run_stage,
)
from msif_lite.eval.unrolled_lm import causal_lm_loss_exact, lm_two_stage, task_measure
from msif_lite.world.training import TrainConfig, qa_batch


def _check_finite(xs: Sequence[Tensor], what: str) -> None:
    if not all(bool(torch.isfinite(x).all()) for x in xs):
        raise FloatingPointError(f"{what} is not finite (overflow in the reverse pass): "
                                 "run it in float64 (TrainingRun.finetune_dtype)")


def _key(q) -> tuple[str, str]:
    return (q.prompt, q.answer) if hasattr(q, "prompt") else (q[0], q[1])


@dataclass
class TrainingRun:
    """Everything needed to replay (and differentiate) the two-stage run that happened.

    model: the model at its initialisation θ₀ (copied, never trained in place); texts:
    the pre-training documents in the order `training.pretrain` saw them (its batch order
    indexes this list), `doc_ids[i]` naming `texts[i]`; finetune_pairs: as `training.
    finetune` got them; block: queries per reverse pass; checkpoint_every: k of the
    replay (None: ⌈√T⌉ per stage)."""

    model: nn.Module
    tokenizer: object
    doc_ids: list[str]
    texts: list[str]
    finetune_pairs: list
    pretrain_cfg: TrainConfig
    finetune_cfg: TrainConfig
    alpha: float
    block: int = 4
    checkpoint_every: int | None = None
    finetune_dtype: torch.dtype = torch.float64
    seconds: dict = field(default_factory=dict)  # wall time of each pass, summed
    _adjoints: dict = field(default_factory=dict, repr=False)
    _grads: dict = field(default_factory=dict, repr=False)
    _problem: TwoStage | None = field(default=None, repr=False)
    _copy: nn.Module | None = field(default=None, repr=False)
    _ft: tuple | None = field(default=None, repr=False)  # (problem, model) in finetune_dtype
    _traj: Trajectory | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.doc_ids) != len(self.texts) or len(set(self.doc_ids)) != len(self.doc_ids):
            raise ValueError("TrainingRun: doc_ids must be unique, one per text")
        if self.block < 1:
            raise ValueError("set TrainingRun.block >= 1")
        self.pretrain_cfg = replace(self.pretrain_cfg, progress=False)
        self.finetune_cfg = replace(self.finetune_cfg, progress=False)

    @classmethod
    def from_pipeline(cls, preset, world, tokenizer, seed: int = 0, **kw) -> TrainingRun:
        """The run `build_world_pipeline(preset, seed=seed)` made (a `PIPELINE_PRESETS` key
        or a `PipelinePreset`), on `world` and `tokenizer` as shipped."""
        from msif_lite.world.lm import build_model
        from msif_lite.world.training import PIPELINE_PRESETS

        p = PIPELINE_PRESETS[preset] if isinstance(preset, str) else preset
        model = build_model(p.model, len(tokenizer), seed, tokenizer)
        docs = world.documents
        return cls(model, tokenizer, [d.doc_id for d in docs], world.pretrain_texts(),
                   list(world.finetune_qa), replace(p.pretrain, seed=seed),
                   replace(p.finetune, seed=seed), p.alpha, **kw)  # fmt: skip

    # ------------------------------------------------------------------ the problem
    @property
    def problem(self) -> TwoStage:
        """`eval.unrolled_lm.lm_two_stage` of this run (built once, on a copy of the model)."""
        if self._problem is None:
            self._copy = copy.deepcopy(self.model)
            self._problem = lm_two_stage(self._copy, self.tokenizer, self.texts,
                                         self.finetune_pairs, self.pretrain_cfg,
                                         self.finetune_cfg, self.alpha)  # fmt: skip
        return self._problem

    def finetune_problem(self) -> tuple[TwoStage, nn.Module]:
        """The same run on a copy of the model in `finetune_dtype` (its fine-tune stage is
        the one the reverse pass walks; the loss kept in that dtype)."""
        if self._ft is None:
            model = copy.deepcopy(self.model).to(self.finetune_dtype)
            if self.finetune_dtype == torch.float64:
                model.loss_function = causal_lm_loss_exact
            one = replace(self.pretrain_cfg, steps=1)  # its pre-training stage is never run
            self._ft = (lm_two_stage(model, self.tokenizer, self.texts[:1], self.finetune_pairs,
                                     one, self.finetune_cfg, self.alpha), model)
        return self._ft

    def measure(self, questions: Sequence, model: nn.Module | None = None) -> Measure:
        """θ ↦ m(q; θ) = −log p(answer | prompt) per question: the retraining ground
        truth's measurement (`eval.retraining.measure`, the `training.qa_batch` encoding)."""
        if model is None:
            model = self.problem and self._copy  # the float32 copy `problem` builds
        dev = next(model.parameters()).device
        return task_measure(model, LanguageModelingTask(),
                            qa_batch(self.tokenizer, list(questions)).to(dev))  # fmt: skip

    def pretrain_trajectory(self) -> Trajectory:
        """The replayed pre-training with its checkpoints (kept: every block reuses it)."""
        if self._traj is None:
            st = self.problem.pretrain
            k = self.checkpoint_every or default_checkpoint_every(st.cfg.steps)
            t0 = time.perf_counter()
            self._traj = run_stage(st, self.problem.theta0, w=self.problem.ones(),
                                   checkpoint_every=k)  # fmt: skip
            self._tick("pretrain_replay", t0)
        return self._traj

    def theta_pt(self) -> Params:
        return self.pretrain_trajectory().final

    def columns(self, doc_ids: Sequence[str]) -> list[int]:
        """Index into w of each document id (a clear error for a document not in the run)."""
        col = {d: i for i, d in enumerate(self.doc_ids)}
        missing = [d for d in doc_ids if d not in col]
        if missing:
            raise ValueError(f"{len(missing)} document(s) were not in the training run (e.g. "
                             f"{missing[0]!r}): the unrolled methods score only documents it "
                             "pre-trained on")  # fmt: skip
        return [col[d] for d in doc_ids]

    def measure_at(self, w: Tensor, questions: Sequence) -> Tensor:
        """m(q; θ_ft(w)) per question, float64: both stages replayed in the run's own batch
        order with document weights w (w_i = 0 removes document i from its batches, which
        keep their places and token normalisers): the counterfactual −dm/dw linearises,
        unlike a retrain on the subset, which reshuffles (`eval.retraining.retrain`)."""
        _, theta_ft = replay(self.problem, w.to(self.problem.ones().dtype))
        return self.measure(questions)(theta_ft).detach().double().cpu()

    # ------------------------------------------------------------------ memoised reverse passes
    def _tick(self, what: str, t0: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - t0

    def _blocks(self, questions: Sequence, have: dict) -> list[list]:
        todo = list({_key(q): q for q in questions if _key(q) not in have}.values())
        return [todo[i : i + self.block] for i in range(0, len(todo), self.block)]

    def finetune_adjoints(self, questions: Sequence) -> list[Params]:
        """dm(q)/dθ_pt per question through the fine-tune (start and anchor together), in
        `finetune_dtype`; a non-finite adjoint is refused (never scored)."""
        for blk in self._blocks(questions, self._adjoints):
            theta_pt = [p.to(self.finetune_dtype) for p in self.theta_pt()]
            problem, model = self.finetune_problem()
            t0 = time.perf_counter()
            _, ft = finetune_adjoint(problem, theta_pt, self.measure(blk, model),
                                     checkpoint_every=self.checkpoint_every)  # fmt: skip
            self._tick("finetune_pass", t0)
            _check_finite(ft.both, "the fine-tune's adjoint dm/dθ_pt")
            for i, q in enumerate(blk):
                self._adjoints[_key(q)] = [a[i].clone() for a in ft.both]
        return [self._adjoints[_key(q)] for q in questions]

    def metagradient(self, questions: Sequence) -> Tensor:
        """(Q, N) dm(q; θ_ft(w))/dw at w = 1 through both stages, columns as `texts`."""
        for blk in self._blocks(questions, self._grads):
            adj = self.finetune_adjoints(blk)
            traj = self.pretrain_trajectory()
            lam = [torch.stack([a[j] for a in adj]).to(p.dtype)
                   for j, p in enumerate(traj.final)]  # fmt: skip
            t0 = time.perf_counter()
            g = pretrain_metagradient(self.problem, lam, trajectory=traj)
            self._tick("pretrain_pass", t0)
            _check_finite([g], "the pre-training metagradient dm/dw")
            for i, q in enumerate(blk):
                self._grads[_key(q)] = g[i].clone()
        return torch.stack([self._grads[_key(q)] for q in questions])
