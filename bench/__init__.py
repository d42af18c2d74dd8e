"""Benchmarks (not tests): Interlock's data path against the direct path and haproxy, in one run."""
