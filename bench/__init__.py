"""Benchmarks: each module here exposes `run() -> str`, one markdown section of results.

`python -m bench` (or `make bench`) runs them all and writes bench/RESULTS.md.
"""
