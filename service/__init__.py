"""The lcs-serve HTTP service: one checkpoint, any alpha, batched, measured and load-aware.

Start it with `python -m service`. Core modules never import FastAPI: `materialize` (alpha -> a
physically compressed network), `cache`, `batcher`, `controller`, `inputs`; `app` is the thin edge.
"""
