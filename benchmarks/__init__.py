"""Speed and memory figures, each a ratio against a baseline measured in the same run.

Run one as ``python -m benchmarks.NAME``; each writes JSON under ``results/``.
"""
