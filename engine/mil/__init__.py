"""Weakly supervised slide classification on the index: gated attention MIL (CLAM-SB-like)
trained on the tile features the indexer already stored, no re-embedding.

- `data`:    bags (one slide = its tile vectors) of indexed, labelled slides, read from the
             shards; the run's input contract (encoder, feature width, label set)
- `model`:   the gated attention-MIL network and its instance clustering loss
- `train`:   one fold's training with early stopping on a validation split
- `cv`:      patient-grouped cross-validation into an atomic, resumable run folder
- `report`:  AUC / balanced accuracy / confusion matrix, JSON + ROC PNG, the catalog run
- `predict`: class probabilities and per-tile attention of a slide from a finished run
"""

from engine.mil.cv import MilOptions, train_run
from engine.mil.data import Bag, BagSet, Contract, load_bags

__all__ = ["Bag", "BagSet", "Contract", "load_bags", "MilOptions", "train_run"]
