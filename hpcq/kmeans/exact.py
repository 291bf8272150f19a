"""Optimal 1-D k-means on a fine histogram of the weights.

Scalar weights are clustered by dynamic programming: in one dimension an optimal clustering splits the
sorted values into k contiguous groups, so ``D[j][i] = min_m D[j-1][m] + cost(m, i)`` over prefix sums
gives the minimum weighted SSE. Running it on n raw values would cost O(k n log n). Instead:

1. One pass puts every value in a fine histogram bin (``bins``, by default 64 per centroid) whose weighted count, sum
   and sum of squares are kept exactly, so the cost of any group of whole bins is exact. Layers with few
   distinct values use one bin per distinct value, which makes the result the true optimum.
2. The DP (divide and conquer over the monotone split points, vectorised level by level:
   O(k * m * log m) time, O(k * m) memory) runs on the m non-empty bins: optimal among groups of whole bins.
3. Lloyd iterations on the bins then move each group edge to the bin nearest the midpoint between its
   centroids, which never raises the SSE. With prefix sums one iteration costs O(k log m), independent of n.

Every value is assigned through its bin (one gather); centroids are the exact weighted means of their
groups and the returned SSE is exact for that assignment. Deterministic: no random start, no sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 1 << 22  # values per chunk when a pass needs float64 temporaries
MAX_LLOYD_ITERATIONS = 200


@dataclass(frozen=True)
class BinStats:
    """Weighted count, sum and sum of squares of each non-empty bin, in value order."""

    weight: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    @property
    def size(self) -> int:
        """Number of bins."""
        return int(self.weight.size)


@dataclass(frozen=True)
class Binned:
    """Values reduced to bins: non-empty bin statistics, every value's bin, and which bins are non-empty.

    ``stats`` row r describes bin ``occupied[r]``; ``bin_of_value`` holds raw bin numbers (0..bins-1).
    """

    stats: BinStats
    bin_of_value: torch.Tensor
    occupied: np.ndarray
    bins: int


def default_bins(k: int) -> int:
    """Histogram resolution: 64 bins per centroid (at least 4,096, at most 65,536).

    Measured on 1M normal weights at k=256: SSE 0.02% above the true optimum (32 per centroid: 0.09%).
    """
    return int(min(1 << 16, max(4096, 64 * k)))


def _chunks(n: int):
    for start in range(0, n, CHUNK):
        yield slice(start, min(n, start + CHUNK))


def _binned(index: torch.Tensor, values: np.ndarray, sample_weight: np.ndarray | None, bins: int) -> Binned:
    # torch's bincount is several times faster than numpy's on large inputs; float64 sums keep the small
    # within-group differences the DP needs.
    x = torch.from_numpy(values).to(torch.float64)
    w = None if sample_weight is None else torch.from_numpy(sample_weight).to(torch.float64)
    weight = torch.bincount(index, weights=w, minlength=bins).numpy()
    total = torch.bincount(index, weights=x if w is None else w * x, minlength=bins).numpy()
    x.mul_(x)
    total_sq = torch.bincount(index, weights=x if w is None else w * x, minlength=bins).numpy()
    occupied = np.flatnonzero(weight > 0)
    stats = BinStats(weight[occupied], total[occupied], total_sq[occupied])
    return Binned(stats, index, occupied, bins)


def histogram(values: np.ndarray, sample_weight: np.ndarray | None, bins: int) -> Binned:
    """Uniform-width histogram of ``values`` with exact per-bin statistics."""
    lo = float(values.min())
    hi = float(values.max())
    scale = (bins - 1e-3) / (hi - lo) if hi > lo else 0.0
    # The bin number only has to be consistent between the statistics and the assignment, so float32 is
    # enough to compute it.
    index = ((torch.from_numpy(values) - lo) * scale).to(torch.int64).clamp_(0, bins - 1)
    return _binned(index, values, sample_weight, bins)


def distinct_values(values: np.ndarray, sample_weight: np.ndarray | None) -> Binned:
    """One bin per distinct value: the DP on these gives the true optimum."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return _binned(torch.from_numpy(inverse.astype(np.int64).reshape(-1)), values, sample_weight, uniq.size)


class _Prefix:
    """Prefix sums over bins, centred for precision; ``cost(a, b)`` = weighted SSE of bins a..b-1."""

    def __init__(self, stats: BinStats) -> None:
        shift = float(stats.total.sum() / stats.weight.sum())
        centred_sq = stats.total_sq - 2 * shift * stats.total + shift * shift * stats.weight
        self.shift = shift
        self.p0 = np.concatenate([[0.0], np.cumsum(stats.weight)])
        self.p1 = np.concatenate([[0.0], np.cumsum(stats.total - shift * stats.weight)])
        self.p2 = np.concatenate([[0.0], np.cumsum(centred_sq)])

    def cost(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        w = self.p0[b] - self.p0[a]
        s = self.p1[b] - self.p1[a]
        return np.maximum(self.p2[b] - self.p2[a] - s * s / w, 0.0)

    def means(self, bounds: np.ndarray) -> np.ndarray:
        w = self.p0[bounds[1:]] - self.p0[bounds[:-1]]
        s = self.p1[bounds[1:]] - self.p1[bounds[:-1]]
        return s / w + self.shift


def _segment_first_argmin(values: np.ndarray, segment: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Index (into ``values``) of the first minimum of each contiguous segment."""
    seg_min = np.minimum.reduceat(values, starts)
    hits = np.flatnonzero(values <= seg_min[segment])
    first = np.ones(hits.size, dtype=bool)
    first[1:] = segment[hits[1:]] != segment[hits[:-1]]
    return hits[first]


def optimal_groups(stats: BinStats, k: int) -> np.ndarray:
    """Split the bins into k contiguous non-empty groups of minimum weighted SSE.

    Returns the k+1 group boundaries as bin indices (0, ..., number of bins).
    """
    m = stats.size
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the number of non-empty bins {m}")
    prefix = _Prefix(stats)
    ends = np.arange(m + 1)
    prev = np.full(m + 1, np.inf)
    prev[1:] = prefix.cost(np.zeros(m, dtype=np.int64), ends[1:])
    splits = np.zeros((k, m + 1), dtype=np.int32)
    for j in range(2, k + 1):
        # Group j ends at bin i; only i in [j, m - (k - j)] can still lead to k non-empty groups.
        last_end = m - (k - j)
        row = np.full(m + 1, np.inf)
        lo_end, hi_end = np.array([j]), np.array([last_end])
        lo_split, hi_split = np.array([j - 1]), np.array([last_end - 1])
        while lo_end.size:
            mid = (lo_end + hi_end) // 2
            lengths = np.minimum(hi_split, mid - 1) - lo_split + 1
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            segment = np.repeat(np.arange(mid.size), lengths)
            cand = lo_split[segment] + (np.arange(starts[-1] + lengths[-1]) - starts[segment])
            vals = prev[cand] + prefix.cost(cand, mid[segment])
            best = _segment_first_argmin(vals, segment, starts)
            best_split = cand[best]
            row[mid] = vals[best]
            splits[j - 1, mid] = best_split
            left = mid - 1 >= lo_end
            right = mid + 1 <= hi_end
            lo_end, hi_end, lo_split, hi_split = (
                np.concatenate([lo_end[left], mid[right] + 1]),
                np.concatenate([mid[left] - 1, hi_end[right]]),
                np.concatenate([lo_split[left], best_split[right]]),
                np.concatenate([best_split[left], hi_split[right]]),
            )
        prev = row
    bounds = np.zeros(k + 1, dtype=np.int64)
    bounds[k] = m
    for j in range(k, 1, -1):
        bounds[j - 1] = splits[j - 1, bounds[j]]
    return bounds


def lloyd_polish(stats: BinStats, bounds: np.ndarray) -> np.ndarray:
    """Lloyd iterations over bins: move each group edge to the midpoint of its two centroids.

    Never raises the SSE; stops when the edges no longer move. Returns the new boundaries.
    """
    prefix = _Prefix(stats)
    bin_means = stats.total / stats.weight
    sse = prefix.cost(bounds[:-1], bounds[1:]).sum()
    for _ in range(MAX_LLOYD_ITERATIONS):
        centroids = prefix.means(bounds)
        inner = np.searchsorted(bin_means, (centroids[1:] + centroids[:-1]) / 2, side="left")
        candidate = np.concatenate([[0], inner, [stats.size]])
        if np.any(np.diff(candidate) <= 0) or np.array_equal(candidate, bounds):
            break
        new_sse = prefix.cost(candidate[:-1], candidate[1:]).sum()
        if new_sse >= sse:
            break
        bounds, sse = candidate, new_sse
    return bounds


def fit_binned(binned: Binned, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Centroids (sorted), per-value assignments and exact SSE for k groups of bins."""
    stats = binned.stats
    bounds = lloyd_polish(stats, optimal_groups(stats, k))
    prefix = _Prefix(stats)
    centroids = prefix.means(bounds)
    sse = float(prefix.cost(bounds[:-1], bounds[1:]).sum())
    dtype = np.uint8 if k <= 256 else np.int32
    group_of_bin = np.zeros(binned.bins, dtype=dtype)
    group_of_bin[binned.occupied] = np.repeat(np.arange(k), np.diff(bounds)).astype(dtype)
    return centroids, torch.from_numpy(group_of_bin)[binned.bin_of_value].numpy(), sse


def assign_nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value; ``centroids`` must be sorted ascending."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    out = np.empty(values.size, dtype=np.uint8 if centroids.size <= 256 else np.int32)
    for part in _chunks(values.size):
        out[part] = np.searchsorted(midpoints, values[part].astype(np.float64), side="left")
    return out
