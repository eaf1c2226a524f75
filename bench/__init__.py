"""Benchmarks (not timed tests): ``python -m bench.run`` measures every caption path on the same images and model."""
