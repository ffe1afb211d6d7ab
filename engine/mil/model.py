"""Gated attention MIL, CLAM-SB-like (Lu et al. 2021, "single branch"): every tile vector is
projected, a gated attention network scores it, the slide is the attention-weighted mean of
the projected tiles, and one linear layer classifies it. The attention weights say which
tiles the decision rests on: the heat map of the web viewer.

The optional instance clustering loss (CLAM's "smooth top-k" supervision, simplified): for
the slide's true class, the k most attended tiles are taught to look positive and the k
least attended negative to an instance classifier; it sharpens the attention on small
evidence regions when slides are few."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class GatedAttentionMIL(nn.Module):
    def __init__(self, dim: int, n_classes: int, hidden: int = 256, attention: int = 128, dropout: float = 0.25):
        super().__init__()
        self.config = {"dim": dim, "n_classes": n_classes, "hidden": hidden, "attention": attention, "dropout": dropout}
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.att_a = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh(), nn.Dropout(dropout))
        self.att_b = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid(), nn.Dropout(dropout))
        self.att_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(hidden, n_classes)
        # one binary tile classifier per class (CLAM-SB's instance classifiers)
        self.instance = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: n x dim tiles of one slide -> (class logits C, raw attention n, projected tiles n x hidden)."""
        h = self.project(x)
        scores = self.att_w(self.att_a(h) * self.att_b(h)).squeeze(-1)
        weights = torch.softmax(scores, dim=0)
        logits = self.classifier(weights @ h)
        return logits, scores, h

    def instance_loss(self, h: torch.Tensor, scores: torch.Tensor, label: int, k: int) -> torch.Tensor:
        """Top-k attended tiles positive, bottom-k negative, for the true class's classifier."""
        # at most a tenth of the slide: evidence is a small part of it, and forcing more
        # tiles than that to look positive teaches the classifier background as evidence
        k = min(k, len(scores) // 10)
        if k < 1:
            return scores.new_zeros(())
        top = torch.topk(scores, k).indices
        bottom = torch.topk(-scores, k).indices
        logits = self.instance[label](torch.cat([h[top], h[bottom]]))
        target = torch.cat([torch.ones(k, dtype=torch.long), torch.zeros(k, dtype=torch.long)]).to(h.device)
        return F.cross_entropy(logits, target)


def build_model(config: dict) -> GatedAttentionMIL:
    return GatedAttentionMIL(**config)
