"""histoseek indexer."""
