"""Shared fixtures: tiny deterministic data and configs so tests stay fast on 2 cores."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)


def blobs(n: int, dim: int = 16, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Separable Gaussian blobs: x (n, dim) float32 in [0, 1], y (n,) int64."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centres = rng.uniform(0.2, 0.8, size=(classes, dim))
    x = np.clip(centres[y] + rng.normal(0, 0.1, size=(n, dim)), 0, 1).astype(np.float32)
    return x, y.astype(np.int64)


def write_parquet(path: str, x: np.ndarray, y: np.ndarray, ids: np.ndarray | None = None) -> str:
    cols = {"x": pa.array(list(x.astype(np.float32)), pa.list_(pa.float32())), "y": pa.array(y, pa.int64())}
    if ids is not None:
        cols["id"] = pa.array(ids, pa.int64())
    pq.write_table(pa.table(cols), path)
    return path


@pytest.fixture
def tiny_parquet(tmp_path):
    x, y = blobs(120, seed=0)
    xt, yt = blobs(30, seed=1)
    tr = write_parquet(str(tmp_path / "train.parquet"), x, y, np.arange(1000, 1120))
    te = write_parquet(str(tmp_path / "test.parquet"), xt, yt)
    return tr, te


TINY_RUN = [
    "--epochs", "3", "--batch-size", "20", "--clusters-per-class", "2", "--ipc", "2",
    "--distill-steps", "10", "--hidden", "16", "--quiet", "--engine", "local",
]
