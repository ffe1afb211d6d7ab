"""Search the archive by region or by slide.

engine.search.engine: SearchEngine, the one object callers hold, composed of
  query (query tiles of a region or a slide), live_index (the index kept in step with the
  catalog), filters (the filter fields and the tile-id filter), ranking (nearest tiles to
  ranked slides), lookups (the catalog reads after the index search), placement (where in a
  slide the region lies: on features, or on pixels by localise + ncc), copies (pixel-verified
  copies ranked first), scale (a region's unknown mpp estimated on a ladder; rescale_match
  verifies copies over scales), results (what a search answers); mosaic: the tiles that stand
  for a slide; which_encoder: the encoder the index was built with, used when none is given.

The names below are imported on first use: the web app reads FILTER_FIELDS at start-up
without loading FAISS and the encoder's dependencies.
"""

import importlib

_EXPORTS = {
    "FILTER_FIELDS": "engine.search.filters",
    "Region": "engine.search.results",
    "SearchEngine": "engine.search.engine",
    "SearchResult": "engine.search.results",
    "SlideHit": "engine.search.results",
    "place_on_features": "engine.search.placement",
    "slide_scores": "engine.search.ranking",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
