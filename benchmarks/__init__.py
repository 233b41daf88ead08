"""Speed and memory figures, each a ratio against a baseline measured in the same run.

Run one as ``python -m benchmarks.NAME``; each writes JSON under ``runs/`` (untracked), or where ``--out``
says (``--out results/``: the repository's figures).
"""
