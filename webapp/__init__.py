"""histoseek webapp."""
