"""What a method may read: the narrow protocol every registered method depends on (the
`Attributor` implements it; a benchmark or a test can pass any object that does)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from msif_lite.attribution.encoder import Encoder
from msif_lite.attribution.settings import ScoreSettings, Stage
from msif_lite.attribution.stage import StageState
from msif_lite.engine.gradstore import Candidate


class ScoringContext(Protocol):
    """The inputs of a score: the two stages, the documents, the text indexes, the extras."""

    encoder: Encoder
    settings: ScoreSettings  # the defaults (α, λ_pt, λ_ft) of this pair
    checkpoints: Sequence  # pre-training checkpoints (TracIn), may be empty
    mentions: Mapping[str, str]  # doc_id → the entity it is about (after-mention), may be empty

    def stage(self, stage: Stage) -> StageState: ...

    def checkpoint_stage(self, checkpoint) -> StageState: ...

    def candidates(self, doc_ids: Sequence[str]) -> list[Candidate]: ...

    def text_index(self, kind: str): ...

    @property
    def provides(self) -> frozenset[str]: ...
