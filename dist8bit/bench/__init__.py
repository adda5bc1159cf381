"""Benchmarks users run on their own hardware: `python -m dist8bit.bench --help`."""
