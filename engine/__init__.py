"""histoseek engine: the core library (encoder, catalog, shard index, search, metrics).

Nothing in here imports `indexer`, `pretrain` or `webapp`; they import us.
"""

__version__ = "0.1.0"
