"""Fixtures for the tests and the benchmarks: tiny random models built on the fly and synthetic
pools of any size. Not part of the installed package (``pyproject.toml`` packages only
``deita_ray``); tests and benchmarks import it from the repository root."""
