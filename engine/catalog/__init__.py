"""The SQL catalog: slides, tiles, shards, encoders, benchmark runs, users and audit.

`from engine.catalog import Catalog, models` is all most callers need.
"""

from engine.catalog import models
from engine.catalog.db import Catalog

__all__ = ["Catalog", "models"]
