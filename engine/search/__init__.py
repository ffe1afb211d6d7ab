"""Search the archive by region or by slide (see engine/search/engine.py for the queries,
engine/search/localise.py for placing a region from its pixels, engine/search/mosaic.py for
the tiles that stand for a slide)."""

from engine.search.engine import SearchEngine, SearchResult, locate_region, slide_scores

__all__ = ["SearchEngine", "SearchResult", "locate_region", "slide_scores"]
