"""Command-line entry points for trime_fairseq."""
