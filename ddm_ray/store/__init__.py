"""Run folders and data access through fsspec URLs."""
