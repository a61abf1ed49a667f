"""Shared core of lcs-serve: the one owner of everything training and serving must agree on.

- `lcs.alpha`: the alpha convention and the alpha -> compression-level schedule per kind.
- `lcs.compress`: the compression operators (top-k mask, channel count, fake quantiser).
- `lcs.layers`: subspace layers (LCS+P point, LCS+L line) that take alpha as an argument.
- `lcs.models`: the architecture registry.
- `lcs.checkpoint`: the versioned safetensors + JSON checkpoint format.
- `lcs.paths`: the paths a command names, checked before its work (a file to read, a place to write).

The service imports this package and never `training`.
"""
