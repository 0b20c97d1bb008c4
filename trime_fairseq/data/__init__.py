"""Data utilities for trime_fairseq (corpus building, datasets)."""
