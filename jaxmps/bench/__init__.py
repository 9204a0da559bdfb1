"""Benchmarks: ``python -m jaxmps.bench`` (see __main__.py)."""
