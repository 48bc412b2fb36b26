"""The kit's own fictional world: entities, facts, a pre-training corpus, QA data.

Notebook 05 ("The kit's own world") builds it; later notebooks use it as ground truth.
Every fact f = (entity, relation, value) is stated in a known set of documents
(its *sources*); queries ask about facts that only pre-training documents state.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from msif_lite.engine.prompts import as_prompt
from msif_lite.world import templates as T
from msif_lite.world.templates import CODAS, ONSETS, RELATIONS, VALUE_BLURBS, VOWELS
from msif_lite.world.templates import render as _render

SCHEMA_VERSION = 1

LATER_FIELDS = {"filler_sentences": 0, "alias_sources": 0, "distractors_per_fact": 0}


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the fictional world (Notebook 05). Presets: `WORLD_PRESETS`."""

    n_entities: int = field(default=120, metadata={"help": "number of fictional people"})
    docs_per_fact: int = field(
        default=4, metadata={"help": "documents stating each fact (its ground-truth sources)"}
    )
    facts_per_doc: int = field(
        default=2, metadata={"help": "facts of one entity stated per biography document"}
    )
    finetune_fraction: float = field(
        default=0.5, metadata={"help": "fraction of entities whose facts form the QA set"}
    )
    pretrain_qa_fraction: float = field(
        default=0.0,
        metadata={"help": "fraction of fine-tuning QA also mixed into pre-training ('mixed')"},
    )
    value_blurbs: bool = field(
        default=True, metadata={"help": "add docs about cities/companies (shared-answer noise)"}
    )
    vocab_size: int = field(default=2048, metadata={"help": "byte-level BPE vocabulary size"})
    filler_sentences: int = field(
        default=0, metadata={"help": "filler sentences per document (realistic length)"})
    alias_sources: int = field(
        default=0, metadata={"help": "of each fact's sources, how many state it about the "
                                     "person's alias (tied to the name by link documents)"})
    distractors_per_fact: int = field(
        default=0, metadata={"help": "documents with the name and the true answer that do "
                                     "not state the fact (co-occurrence distractors)"})

    def __post_init__(self) -> None:
        n_templates = min(len(t) for _, t, _ in RELATIONS.values())
        if self.n_entities < 4:
            raise ValueError(f"n_entities={self.n_entities}: set WorldConfig.n_entities >= 4")
        if not 1 <= self.docs_per_fact <= n_templates:
            raise ValueError(f"set WorldConfig.docs_per_fact in [1, {n_templates}]")
        if self.facts_per_doc not in (1, 2, 4):
            raise ValueError("set WorldConfig.facts_per_doc to 1, 2 or 4 (divides 4 relations)")
        if not 0.0 < self.finetune_fraction < 1.0:
            raise ValueError("set WorldConfig.finetune_fraction strictly between 0 and 1")
        if not 0.0 <= self.pretrain_qa_fraction <= 1.0:
            raise ValueError("set WorldConfig.pretrain_qa_fraction in [0, 1]")
        if not 300 <= self.vocab_size <= 32000:
            raise ValueError("set WorldConfig.vocab_size in [300, 32000]")
        if not 0 <= self.alias_sources < self.docs_per_fact:
            raise ValueError("set WorldConfig.alias_sources in [0, docs_per_fact): at least one "
                             "source must name the person")
        if self.filler_sentences < 0 or self.distractors_per_fact < 0:
            raise ValueError("set WorldConfig.filler_sentences and distractors_per_fact >= 0")

    @property
    def realistic(self) -> bool:
        return bool(self.filler_sentences or self.alias_sources or self.distractors_per_fact)


WORLD_PRESETS: dict[str, WorldConfig] = {
    "ci-fast": WorldConfig(n_entities=24, docs_per_fact=3, vocab_size=1024),
    "default": WorldConfig(),
    "lds": WorldConfig(n_entities=26, docs_per_fact=3, vocab_size=1024),  # 200 docs, 52 queries
    # the second counterfactual world (notebook 10, docs/design.md §A world where the cause is
    # not lexically visible): longer documents, one source per fact about an alias, and
    # co-occurrence distractors
    "lds-hard": WorldConfig(n_entities=26, docs_per_fact=3, vocab_size=1536, filler_sentences=3,
                            alias_sources=1, distractors_per_fact=1),
    "large": WorldConfig(n_entities=2000, docs_per_fact=4, vocab_size=4096),
}


@dataclass(frozen=True)
class Entity:
    entity_id: str
    name: str
    finetune: bool  # True: its facts are in the fine-tuning QA set


@dataclass(frozen=True)
class Fact:
    fact_id: str
    entity_id: str
    relation: str
    value: str
    source_doc_ids: tuple[str, ...]


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    fact_ids: tuple[str, ...]
    kind: str  # "bio" (states facts), "qa" (mixed-in QA), "blurb" (about a value), "link"
    # (name ↔ alias), "distractor" (name and answer, not stating the fact)


@dataclass(frozen=True)
class QAPair:
    fact_id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Query:
    fact_id: str
    prompt: str
    answer: str
    source_doc_ids: tuple[str, ...]


@dataclass
class World:
    """Everything generated from (config, seed). `save`/`load_world` round-trip it."""

    config: WorldConfig
    seed: int
    preset: str
    entities: list[Entity]
    facts: list[Fact]
    documents: list[Document]
    finetune_qa: list[QAPair]
    queries: list[Query]

    def fact(self, fact_id: str) -> Fact:
        return self._facts_by_id()[fact_id]

    def _facts_by_id(self) -> dict[str, Fact]:
        return {f.fact_id: f for f in self.facts}

    def entity_name(self, entity_id: str) -> str:
        return next(e.name for e in self.entities if e.entity_id == entity_id)

    def _files(self) -> dict[str, bytes]:
        def jsonl(rows: list) -> bytes:
            return "".join(json.dumps(asdict(r), sort_keys=True) + "\n" for r in rows).encode()

        return {
            "entities.jsonl": jsonl(self.entities),
            "facts.jsonl": jsonl(self.facts),
            "documents.jsonl": jsonl(self.documents),
            "finetune_qa.jsonl": jsonl(self.finetune_qa),
            "queries.jsonl": jsonl(self.queries),
        }

    @property
    def content_hash(self) -> str:
        """sha256 over all JSON-lines files: the 'data hash' checkpoints record."""
        return files_hash(self._files())

    def document_mentions(self) -> dict[str, str]:
        """doc_id → the name of the entity a document states facts about (documents that
        state none are left out): the mentions of Notebook 11's after-mention variant."""
        return {d.doc_id: self.entity_name(self.fact(d.fact_ids[0]).entity_id)
                for d in self.documents if d.fact_ids}  # fmt: skip

    def pretrain_texts(self) -> list[str]:
        """The pre-training corpus as strings (documents of every kind, in doc-id order)."""
        return [d.text for d in self.documents]

    def chance_accuracy(self) -> float:
        """Mean over queries of 1/|value set of its relation| (uniform guessing)."""
        facts = self._facts_by_id()
        return sum(1 / len(RELATIONS[facts[q.fact_id].relation][0]) for q in self.queries) / len(
            self.queries
        )

    def majority_accuracy(self) -> float:
        """Accuracy of answering each relation with its most frequent fine-tuning answer."""
        facts = self._facts_by_id()
        counts: dict[str, dict[str, int]] = {}
        for qa in self.finetune_qa:
            rel = counts.setdefault(facts[qa.fact_id].relation, {})
            rel[qa.answer] = rel.get(qa.answer, 0) + 1
        best = {r: max(c, key=lambda v: (c[v], v)) for r, c in counts.items()}
        hits = sum(best.get(facts[q.fact_id].relation) == q.answer for q in self.queries)
        return hits / len(self.queries)

    def save(self, out_dir: str | Path) -> Path:
        """Write `*.jsonl` + `world.json` (config, seed, preset, content hash)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in self._files().items():
            (out / name).write_bytes(data)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "preset": self.preset,
            "seed": self.seed,
            "config": {k: v for k, v in asdict(self.config).items()  # later fields only when set,
                       if k not in LATER_FIELDS or v != LATER_FIELDS[k]},  # so old manifests hold
            "content_hash": self.content_hash,
            "counts": {k.removesuffix(".jsonl"): v.count(b"\n") for k, v in self._files().items()},
            "chance_accuracy": round(self.chance_accuracy(), 6),
            "majority_accuracy": round(self.majority_accuracy(), 6),
        }
        (out / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return out


def files_hash(files: dict[str, bytes]) -> str:
    """sha256 over named files (name, NUL, bytes; sorted by name): a world's data hash."""
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + data)
    return h.hexdigest()


def _name(rng: random.Random) -> str:
    def part(n_syll: int) -> str:
        s = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(n_syll))
        return (s + rng.choice(CODAS)).capitalize()

    return f"{part(rng.choice([1, 2]))} {part(2)}"


def _aliases(rng: random.Random, entities: list[Entity]) -> dict[str, str]:
    """A unique descriptive alias per person ("the keeper of the silver compass")."""
    out: dict[str, str] = {}
    while len(out) < len(entities):
        a = (f"the {rng.choice(T.ALIAS_ROLES)} of the {rng.choice(T.ALIAS_ADJECTIVES)} "
             f"{rng.choice(T.ALIAS_OBJECTS)}")  # fmt: skip
        if a not in out.values():
            out[entities[len(out)].entity_id] = a
    return out


def _with_filler(rng: random.Random, text: str, name: str | None, cfg: WorldConfig) -> str:
    """`text` with cfg.filler_sentences filler sentences around it; with name=None only
    fillers that do not mention the person (an alias source stays free of the name)."""
    pool = [f for f in T.FILLER if name is not None or "{name}" not in f]
    fill = [f.format(name=name) for f in rng.sample(pool, cfg.filler_sentences)]
    k = rng.randint(0, len(fill))
    return " ".join(fill[:k] + [text] + fill[k:])


def _links_and_distractors(rng: random.Random, entities, raw_facts, aliases: dict[str, str],
                           cfg: WorldConfig) -> list[tuple[str, tuple[str, ...], str]]:
    """Link documents (name ↔ alias, two per person) and co-occurrence distractors (name and
    true answer, not stating the fact), each padded with filler."""
    out = []
    for e in entities:
        if e.entity_id in aliases:
            for link in rng.sample(T.ALIAS_LINKS, 2):
                a = aliases[e.entity_id]
                text = link.format(name=e.name, alias=a, Alias=a[0].upper() + a[1:])
                out.append((_with_filler(rng, text, e.name, cfg), (), "link"))
    for _, e, rel, v in raw_facts:
        for t in rng.sample(T.DISTRACTORS[rel], cfg.distractors_per_fact):
            out.append((_with_filler(rng, _render(t, e.name, v), e.name, cfg), (), "distractor"))
    return out


def question(relation: str, name: str) -> str:
    """The QA prompt for (relation, entity): 'Question: ...\\nAnswer:'. Notebook 05 §1."""
    return as_prompt(RELATIONS[relation][2].format(name=name))


def make_world(preset_or_config: str | WorldConfig = "default", seed: int = 0) -> World:
    """Generate the world deterministically from (config, seed). Notebook 05, section 1.

    Each fact is stated in exactly `docs_per_fact` biography documents, each with a
    different paraphrase template; QA for the fine-tuning entities is optionally mixed
    into pre-training; queries are the remaining (pre-training-only) facts.
    """
    if isinstance(preset_or_config, str):
        if preset_or_config not in WORLD_PRESETS:
            raise ValueError(
                f"unknown world preset {preset_or_config!r}: use {list(WORLD_PRESETS)}"
            )
        cfg, preset = WORLD_PRESETS[preset_or_config], preset_or_config
    else:
        cfg, preset = preset_or_config, "custom"
    rng = random.Random(f"msif-world-{seed}")
    names: set[str] = set()
    used_parts: set[str] = set()
    while len(names) < cfg.n_entities:
        cand = _name(rng)
        parts = set(cand.lower().split())
        if len(parts) == 2 and not parts & used_parts:  # no name part shared between people
            names.add(cand)
            used_parts |= parts
    name_list = sorted(names)
    rng.shuffle(name_list)
    n_ft = max(1, min(cfg.n_entities - 1, round(cfg.finetune_fraction * cfg.n_entities)))
    entities = [Entity(f"e{i:04d}", n, i < n_ft) for i, n in enumerate(name_list)]
    raw_facts = [  # (fact_id, entity, relation, value)
        (f"f{4 * i + j:05d}", e, rel, rng.choice(RELATIONS[rel][0]))
        for i, e in enumerate(entities)
        for j, rel in enumerate(RELATIONS)
    ]
    # The realistic world's extras draw from their own stream: the other worlds are unchanged.
    rng2 = random.Random(f"msif-world-{seed}-realistic")
    aliases = _aliases(rng2, entities) if cfg.alias_sources else {}
    # Biographies: round r states every fact of an entity once, grouped facts_per_doc at a time.
    drafts: list[tuple[str, tuple[str, ...], str]] = []  # (text, fact ids, kind)
    drafts += _links_and_distractors(rng2, entities, raw_facts, aliases, cfg)
    for i, e in enumerate(entities):
        mine = raw_facts[4 * i : 4 * i + 4]
        tmpl_order = {
            f[0]: rng.sample(range(len(RELATIONS[f[2]][1])), cfg.docs_per_fact) for f in mine
        }
        for r in range(cfg.docs_per_fact):
            order = rng.sample(mine, len(mine))
            about = aliases.get(e.entity_id) if r >= cfg.docs_per_fact - cfg.alias_sources else None
            for k in range(0, 4, cfg.facts_per_doc):
                group = order[k : k + cfg.facts_per_doc]
                text = " ".join(
                    _render(RELATIONS[rel][1][tmpl_order[fid][r]], about or e.name, v)
                    for fid, _, rel, v in group
                )
                if cfg.realistic:
                    text = _with_filler(rng2, text, None if about else e.name, cfg)
                drafts.append((text, tuple(sorted(f[0] for f in group)), "bio"))
    qa_pairs = [QAPair(fid, question(rel, e.name), v) for fid, e, rel, v in raw_facts if e.finetune]
    n_mixed = round(cfg.pretrain_qa_fraction * len(qa_pairs))
    for qa in rng.sample(qa_pairs, n_mixed):
        drafts.append((f"{qa.prompt} {qa.answer}", (qa.fact_id,), "qa"))
    if cfg.value_blurbs:
        for rel, blurb in VALUE_BLURBS.items():
            for v in RELATIONS[rel][0]:
                drafts.append((blurb.format(v=v, n=rng.randint(2, 40)), (), "blurb"))
    rng.shuffle(drafts)
    documents = [Document(f"d{i:05d}", t, f, k) for i, (t, f, k) in enumerate(drafts)]
    sources: dict[str, list[str]] = {f[0]: [] for f in raw_facts}
    for d in documents:
        for fid in d.fact_ids:
            sources[fid].append(d.doc_id)
    facts = [Fact(fid, e.entity_id, rel, v, tuple(sources[fid])) for fid, e, rel, v in raw_facts]
    queries = [
        Query(f.fact_id, question(f.relation, e.name), f.value, f.source_doc_ids)
        for f, (_, e, _, _) in zip(facts, raw_facts)
        if not e.finetune
    ]
    return World(cfg, seed, preset, entities, facts, documents, qa_pairs, queries)


def _tuples(row: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}


def load_world(in_dir: str | Path) -> World:
    """Read a world written by `World.save`; checks the content hash. Notebook 05 §1."""
    d = Path(in_dir)
    if not (d / "world.json").exists():
        raise FileNotFoundError(f"{d}/world.json missing: run make_world(...).save({str(d)!r})")
    manifest = json.loads((d / "world.json").read_text())

    def rows(name: str, cls):
        lines = (d / name).read_text().splitlines()
        return [cls(**_tuples(json.loads(x))) for x in lines if x]

    world = World(
        WorldConfig(**manifest["config"]),
        manifest["seed"],
        manifest["preset"],
        rows("entities.jsonl", Entity),
        rows("facts.jsonl", Fact),
        rows("documents.jsonl", Document),
        rows("finetune_qa.jsonl", QAPair),
        rows("queries.jsonl", Query),
    )
    if world.content_hash != manifest["content_hash"]:
        raise ValueError(
            f"{d}: files do not match world.json's content_hash; regenerate with "
            f"make_world({manifest['preset']!r}, seed={manifest['seed']}).save(dir)"
        )
    return world


def states_fact(text: str, name: str, relation: str, value: str) -> bool:
    """True when `text` renders (name, relation, value) with a relation template (Notebook 05)."""
    for tmpl in RELATIONS[relation][1]:
        if _render(tmpl, name, value) in text:
            return True
    return bool(re.search(re.escape(question(relation, name)) + r" " + re.escape(value), text))
