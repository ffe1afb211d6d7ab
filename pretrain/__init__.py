"""Distributed CCL pretraining of the histoseek encoder, and linear probing (`python -m pretrain`)."""
