"""The benchmark suite behind ``benchmarks/run_all.py``: sizes, preparation, running, report."""
