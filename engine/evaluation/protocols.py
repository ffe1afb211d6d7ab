"""The peers' evaluation protocols: which figures each reports, under its own names.

Every protocol scores the same leave-one-out neighbour lists (engine.evaluation.knn) with the
metrics defined once in engine.evaluation.metrics; a protocol only chooses the figures, their
names and their k:

- retccl (default): Acc@k for every k and mMV@k at the largest k, as in the RetCCL tables
  (Wang et al. 2023, github.com/Xiyue-Wang/RetCCL README; the evaluation code is not released).
- sish: mMV@k and mAP@k for every k, mAP normalised by k (SISH `eval.py`,
  github.com/mahmoodlab/SISH); SISH publishes k = 5 for subtypes and 10 for sites and excludes
  the query's patient.
- yottixel: leave-one-slide-out majority vote of the top k, reported as macro-F1 as
  scikit-learn's `classification_report` computes it (Kalra et al. 2020, Yottixel).

Where a peer leaves a detail open, one rule holds everywhere: a majority-vote tie goes to the
best-ranked of the tied labels; missing results (fewer than k left after the exclusion) count
as wrong and never vote.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from engine.evaluation.metrics import hits_at_k, macro_f1_at_k, map_at_k, mmv_at_k


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    title: str
    source: str
    default_ks: tuple[int, ...]
    preferred_exclusion: str
    definitions: tuple[str, ...]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "source": self.source,
            "preferred_exclusion": self.preferred_exclusion,
            "definitions": list(self.definitions),
        }


RETCCL = Protocol(
    "retccl",
    "RetCCL (Wang et al. 2023): Acc@k and mMV@5",
    "RetCCL paper tables, github.com/Xiyue-Wang/RetCCL README; no evaluation code released",
    (1, 3, 5),
    "image",
    (
        "acc@k: the query's label is among its top k results",
        "mMV@k (largest k): majority vote of the top k correct, averaged per class of the queries",
    ),
)
SISH = Protocol(
    "sish",
    "SISH (Chen et al. 2022): mMV@k and mAP@k",
    "github.com/mahmoodlab/SISH eval.py",
    (5, 10),
    "patient",
    (
        "mMV@k: per-class majority-vote accuracy of the top k, averaged over classes (k = 5 for subtypes, 10 for sites)",
        "majority-vote ties go to the best-ranked of the tied labels",
        "mAP@k: mean over queries of (1/k) x sum over i <= k of precision@i x rel_i",
        "the query's patient (TCGA participant) is excluded",
    ),
)
YOTTIXEL = Protocol(
    "yottixel",
    "Yottixel (Kalra et al. 2020): leave-one-slide-out majority vote, macro-F1",
    "Kalra et al., Medical Image Analysis 2020; F1 as sklearn.metrics.classification_report 'macro avg'",
    (1, 3, 5),
    "slide",
    (
        "leave-one-slide-out: a query never retrieves its own slide",
        "prediction: majority vote of the top k (ties to the best-ranked of the tied labels)",
        "macro_f1@k: per-class F1 of those predictions, unweighted mean over the classes that are a label or a prediction",
    ),
)
PROTOCOLS = {p.name: p for p in (RETCCL, SISH, YOTTIXEL)}
DEFAULT_PROTOCOL = "retccl"


STRICTNESS = ("image", "slide", "patient")


def exclusion_note(name: str | None, exclusion: str) -> str | None:
    """A sentence when the run excluded less than the protocol's authors did, else None."""
    protocol = get_protocol(name)
    if STRICTNESS.index(exclusion) >= STRICTNESS.index(protocol.preferred_exclusion):
        return None
    return f"{protocol.name} excludes the query's {protocol.preferred_exclusion}; this run excluded only its {exclusion} (the data set records no {protocol.preferred_exclusion}, or --exclude chose less)"


def get_protocol(name: str | None) -> Protocol:
    name = name or DEFAULT_PROTOCOL
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def protocol_figures(
    name: str | None, query: np.ndarray, neighbours: np.ndarray, ks: Sequence[int]
) -> dict[str, float]:
    """The protocol's figures, named as it names them, as fractions in [0, 1].

    query: (n,) class codes; neighbours: (n, K) class codes of the ranked results, MISSING
    where fewer than K survived the exclusion; ks: each <= K.
    """
    protocol = get_protocol(name)
    ks = sorted(set(int(k) for k in ks))
    out: dict[str, float] = {}
    if protocol.name == "retccl":
        for k in ks:
            out[f"acc@{k}"] = float(hits_at_k(query, neighbours, k).mean())
        out[f"mMV@{ks[-1]}"] = mmv_at_k(query, neighbours, ks[-1])
    elif protocol.name == "sish":
        for k in ks:
            out[f"mMV@{k}"] = mmv_at_k(query, neighbours, k)
        for k in ks:
            out[f"mAP@{k}"] = map_at_k(query, neighbours, k, normalise="k")
    else:
        for k in ks:
            out[f"macro_f1@{k}"] = macro_f1_at_k(query, neighbours, k)
    return out
