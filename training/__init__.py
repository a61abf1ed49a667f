"""Offline training of compressible subspaces (LCS) and their evaluation. Run `python -m training --help`."""
