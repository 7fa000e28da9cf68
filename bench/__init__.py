"""The benchmark harness: `python -m bench.run` (or `make bench`); its last report is RESULTS.md."""
