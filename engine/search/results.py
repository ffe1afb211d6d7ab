"""What a search answers: the result slides, each with where in it the match is, and the
label the top slides vote for."""

from __future__ import annotations

import dataclasses

from engine.vote import majority_vote

MAX_REGIONS = 10  # matched boxes reported per slide


@dataclasses.dataclass
class Region:
    """A matched place, as a level-0 box of the result slide. `match` says how it was
    found: "features" (a tile matched by encoder features; score = cosine similarity) or
    "pixels" (the region's own pixels registered on the slide, engine.search.localise; score =
    the normalised cross-correlation of its texture, accepted from ACCEPT_NCC up)."""

    x: int
    y: int
    w: int
    h: int
    score: float
    match: str = "features"


@dataclasses.dataclass
class SlideHit:
    rank: int
    slide: dict  # id, path, patient, site, diagnosis, label
    score: float
    regions: list[Region]


@dataclasses.dataclass
class SearchResult:
    query: dict
    results: list[SlideHit]
    suggestion: dict
    timing_ms: dict
    # what the answer left out (quarantined shards, missing slide files); degraded = any
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "degraded": bool(self.warnings),
            "warnings": list(self.warnings),
            "query": self.query,
            "results": [
                {
                    "rank": h.rank,
                    "slide": h.slide,
                    "score": round(h.score, 6),
                    "regions": [{**dataclasses.asdict(r), "score": round(r.score, 6)} for r in h.regions],
                }
                for h in self.results
            ],
            "suggestion": self.suggestion,
            "timing_ms": {k: round(v, 2) for k, v in self.timing_ms.items()},
        }


def suggest(hits: list[SlideHit]) -> dict:
    """The majority label (else diagnosis) of the result slides and every label's votes
    (engine.vote: a tie goes to the best-ranked of the tied labels)."""
    labels = [h.slide["label"] or h.slide["diagnosis"] for h in hits]
    labels = [lab for lab in labels if lab]
    if not labels:
        return {"label": None, "votes": {}}
    label, votes = majority_vote(labels)
    return {"label": label, "votes": votes}
