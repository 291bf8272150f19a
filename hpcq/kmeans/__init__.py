"""Codebook fitting: one interface, two backends.

- ``exact`` (default for scalar weights): optimal 1-D k-means on a fine histogram (compiled with numba),
  deterministic.
- ``faiss``: ``faiss.Kmeans`` on GPU when present, CPU otherwise, with ``niter``, ``seed`` and
  ``max_points_per_centroid`` set explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcq.errors import QuantizationError
from hpcq.kmeans import exact
from hpcq.kmeans.faiss_backend import fit_faiss

METHODS = ("exact", "faiss")


@dataclass(frozen=True)
class CodebookFit:
    """A fitted codebook: sorted float32 centroids, one centroid index per value, and the weighted SSE."""

    centroids: np.ndarray
    assignments: np.ndarray
    sse: float

    @property
    def k(self) -> int:
        """Number of centroids."""
        return int(self.centroids.size)


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32).reshape(-1))


def _check_inputs(values: np.ndarray, k: int, sample_weight: np.ndarray | None) -> tuple[float, float]:
    """Raise QuantizationError for unusable inputs; return the smallest and largest value."""
    if values.size == 0:
        raise QuantizationError("cannot fit a codebook to an empty tensor (the layer has no weights)")
    if not isinstance(k, int | np.integer) or isinstance(k, bool) or k < 1:
        raise QuantizationError(f"number of centroids k must be an integer >= 1, got {k!r}")
    # NaN propagates into min and max, and an infinity is one of them: two reductions check every value.
    lo, hi = float(values.min()), float(values.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = int(values.size - np.isfinite(values).sum())
        raise QuantizationError(f"{bad} of {values.size} weights are NaN or infinite; fix the model before quantizing")
    if sample_weight is not None:
        if sample_weight.shape != values.shape:
            raise QuantizationError(
                f"sample_weight has {sample_weight.size} values but there are {values.size} weights"
            )
        if not np.all(np.isfinite(sample_weight)) or np.any(sample_weight < 0) or not sample_weight.sum() > 0:
            raise QuantizationError("sample_weight must be finite, >= 0 and not all zero")
    # Cheap check first: a prefix with k distinct values proves there are enough.
    if np.unique(values[: 64 * k]).size < k:
        distinct = np.unique(values).size
        if distinct < k:
            raise QuantizationError(
                f"k={k} is more centroids than the {distinct} distinct values in the tensor; use k <= {distinct}"
            )
    return lo, hi


def weighted_sse(values: np.ndarray, sample_weight: np.ndarray | None, centroids: np.ndarray, assignments: np.ndarray) -> float:
    """Weighted sum of squared distances of the values to their assigned centroids."""
    total = 0.0
    for start in range(0, values.size, exact.VALUES_PER_CHUNK):
        part = slice(start, start + exact.VALUES_PER_CHUNK)
        diff = values[part].astype(np.float64) - centroids[assignments[part]].astype(np.float64)
        sq = diff * diff
        total += float(sq.sum() if sample_weight is None else (sq * sample_weight[part]).sum())
    return total


def fit_codebook(
    values: np.ndarray | torch.Tensor,
    k: int,
    *,
    method: str = "exact",
    sample_weight: np.ndarray | torch.Tensor | None = None,
    bins: int = 0,
    niter: int = 25,
    seed: int = 0,
    max_points_per_centroid: int = 0,
    device: str = "auto",
) -> CodebookFit:
    """Fit a k-centroid codebook to the scalar ``values`` (any shape; flattened).

    ``sample_weight`` (same number of values, >= 0) weighs each value's squared error, e.g. by its
    sensitivity. ``bins`` sets the exact method's histogram resolution (0: 65,536). ``niter``, ``seed``,
    ``max_points_per_centroid`` (0: all points) and ``device`` configure the FAISS method, which ignores
    ``sample_weight`` only by refusing it. Errors: empty input, NaN/inf, k < 1, k above the distinct values.
    """
    if method not in METHODS:
        raise QuantizationError(f"unknown k-means method {method!r}; choose one of {METHODS}")
    if bins and bins < 4 * k:
        raise QuantizationError(f"kmeans.bins={bins} is too few for k={k}: use 0 (automatic) or at least {4 * k}")
    x = _as_numpy(values)
    w = None if sample_weight is None else _as_numpy(sample_weight)
    value_range = _check_inputs(x, k, w)
    if method == "faiss":
        if w is not None:
            raise QuantizationError("the faiss method has no per-value weights; use method exact for sample_weight")
        centroids = np.sort(
            fit_faiss(x.reshape(-1, 1), k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                      device=device).reshape(-1)
        ).astype(np.float64)
        assignments = exact.assign_nearest(x, centroids)
        sse = weighted_sse(x, w, centroids, assignments)
    else:
        centroids, assignments, sse = _fit_exact(x, k, w, bins or exact.DEFAULT_BINS, value_range)
    return CodebookFit(centroids.astype(np.float32), assignments, sse)


def _fit_exact(
    x: np.ndarray, k: int, w: np.ndarray | None, bins: int, value_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, float]:
    if x.size <= bins:
        binned = exact.distinct_values(x, w)
    else:
        binned = exact.histogram(x, w, bins, value_range)
        if binned.stats.size < exact.coarse_cells(k):  # crowded (a far outlier): bins where the values are
            binned = exact.robust_histogram(x, w, bins, value_range)
        if binned.stats.size < k:  # so many ties that there are few distinct values: one bin for each
            binned = exact.distinct_values(x, w)
    if binned.stats.size < k:
        raise QuantizationError(
            f"k={k} is more centroids than the {binned.stats.size} distinct values with non-zero weight"
        )
    return exact.fit_binned(x, binned, k)
