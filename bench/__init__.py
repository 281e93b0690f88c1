"""Benchmarks, run by hand (`python -m bench --help`); never part of the test run."""
