"""histoseek pretrain."""
