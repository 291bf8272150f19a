"""Optimal 1-D k-means for scalar weights, on a fine histogram, with compiled inner loops.

In one dimension an optimal clustering splits the sorted values into k contiguous groups, so a dynamic
programme over prefix sums, ``D[j][i] = min_s D[j-1][s] + cost(s, i)``, finds the minimum weighted SSE.
On n raw values that costs O(k n) at best; instead:

1. **Fine bins.** One pass (compiled, multi-threaded) puts every value in one of ``bins`` (default 65,536)
   uniform bins whose weighted count, sum and sum of squares are kept exactly, so the cost of any group of
   whole bins is exact. A tensor with no more values than bins uses one bin per distinct value instead.
2. **Groups of bins.** With at most ``max(2048, 32 k)`` non-empty bins the DP runs on them directly: the
   optimum among groups of whole bins, which for distinct values is the true optimum. Otherwise the DP
   runs on coarse cells (a uniform grid of ``max(2048, 32 k)`` cells over the bins' means), and a banded
   DP on the fine bins then moves every group edge to its best place within two cells either side,
   re-centred until no edge stops at the edge of its band. Lloyd steps over whole bins polish the result
   (never raising the SSE).
3. **Assignment.** A second pass maps every value through its bin to its group (one table lookup).

Centroids are the weighted means of their groups (rounded to float32, as stored) and the SSE is that of
the returned centroids and assignment (up to float64 rounding of the bins' sums; see docs/kmeans.md).
Deterministic: no random start, no sampling, and the histogram's partial sums are added in an order that
does not depend on the number of threads. Measured against the true optimum (benchmarks/kmeans.py):
0.0017% above it at n = 1M, k = 256.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np
import torch

from hpcq.kmeans import kernels

DEFAULT_BINS = 1 << 16
COARSE_CELLS_PER_CENTROID = 32
MIN_COARSE_CELLS = 2048
BAND_REACH_CELLS = 2
MAX_BAND_ROUNDS = 32
MAX_LLOYD_ITERATIONS = 1000
VALUES_PER_CHUNK = 1 << 20
MAX_CHUNKS = 8
# Values sampled (evenly strided) to place quantile bins.
QUANTILE_SAMPLE = 1 << 20
# A robust grid spans the median -/+ ROBUST_SPREAD times its distance to the ROBUST_TAIL quantiles.
ROBUST_SPREAD = 4.0
# Bins on each side of it, for the outliers.
OUTER_BINS = 4096
# Weight beyond which, at either end, bins count as outliers for the coarse grid of crowded values.
ROBUST_TAIL = 1e-4


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

    @property
    def means(self) -> np.ndarray:
        """Weighted mean of each bin."""
        return self.total / self.weight


@dataclass(frozen=True)
class Binned:
    """Values reduced to bins: the non-empty bins' statistics and how to map every value to its bin.

    Either a histogram (``occupied[r]`` is the raw bin of non-empty bin r) on a piecewise uniform
    ``grid`` (see ``kernels._bin_of``), or one bin per distinct value (``inverse`` maps every value to its
    bin).
    """

    stats: BinStats
    occupied: np.ndarray
    raw_bins: int
    grid: np.ndarray | None = None
    raw_centres: np.ndarray | None = None
    inverse: np.ndarray | None = None

    def assign(self, values: np.ndarray, group_of_bin: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """Group of every value: its bin's group; values in bins without weight (only possible with zero
        sample weights) go to the nearest centroid."""
        dtype = np.uint8 if centroids.size <= 256 else np.int32
        table = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, self.raw_centres).astype(dtype)
        table[self.occupied] = group_of_bin.astype(dtype)
        if self.inverse is not None:
            return table[self.inverse]
        with numba_threads():
            return kernels.lookup_bins(values, self.grid, table, chunks_for(values.size))


@contextlib.contextmanager
def numba_threads() -> Iterator[None]:
    """Run compiled loops on as many threads as torch uses here (1 in a throttled sweep task)."""
    before = numba.get_num_threads()
    numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS, torch.get_num_threads())))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def chunks_for(n: int) -> int:
    """Fixed parts of a pass over n values (a function of n only, for thread-independent sums)."""
    return int(min(MAX_CHUNKS, max(1, n // VALUES_PER_CHUNK)))


def coarse_cells(k: int) -> int:
    """Cells of the coarse DP for k centroids."""
    return max(MIN_COARSE_CELLS, COARSE_CELLS_PER_CENTROID * k)


def histogram(
    values: np.ndarray, sample_weight: np.ndarray | None, bins: int, value_range: tuple[float, float] | None = None
) -> Binned:
    """Uniform-width histogram of ``values`` (float32, contiguous) with exact per-bin statistics.
    ``value_range``: (min, max) of the values when the caller already has them."""
    lo, hi = value_range or (float(values.min()), float(values.max()))
    return _binned_histogram(values, sample_weight, _grid(lo, lo, hi, hi, 0, bins))


def robust_histogram(values: np.ndarray, sample_weight: np.ndarray | None, bins: int,
                     value_range: tuple[float, float] | None = None) -> Binned:
    """Histogram for values that crowd into a few uniform bins because far outliers stretch the range:
    ``bins`` uniform bins over the bulk (the median -/+ ROBUST_SPREAD times its distance to the ROBUST_TAIL
    quantiles of an evenly strided sample), OUTER_BINS more on each side of it for the outliers."""
    lo, hi = value_range or (float(values.min()), float(values.max()))
    sample = values[:: max(1, values.size // QUANTILE_SAMPLE)].astype(np.float64)
    ranks = [int(ROBUST_TAIL * (sample.size - 1)), sample.size // 2, int((1 - ROBUST_TAIL) * (sample.size - 1))]
    low_q, median, high_q = np.partition(sample, ranks)[ranks]
    a = max(lo, median - ROBUST_SPREAD * (median - low_q))
    b = min(hi, median + ROBUST_SPREAD * (high_q - median))
    if not a < b:  # the bulk is one value: the outliers decide
        a, b = lo, hi
    return _binned_histogram(values, sample_weight, _grid(lo, a, b, hi, OUTER_BINS, bins))


def _grid(lowest: float, a: float, b: float, highest: float, outer_bins: int, mid_bins: int) -> np.ndarray:
    """The piecewise uniform grid of ``kernels._bin_of``."""
    def scale(start: float, stop: float, count: int) -> float:
        return (count - 1e-3) / (stop - start) if stop > start else 0.0

    return np.array([lowest, a, b, scale(lowest, a, outer_bins), scale(a, b, mid_bins), scale(b, highest, outer_bins),
                     outer_bins, mid_bins], dtype=np.float64)


def _grid_centres(grid: np.ndarray) -> np.ndarray:
    lowest, a, b, low_scale, mid_scale, high_scale, outer, mid = grid
    outer, mid = int(outer), int(mid)

    def centres(start: float, scale: float, count: int) -> np.ndarray:
        return start + (np.arange(count) + 0.5) / scale if scale else np.full(count, start)

    return np.concatenate([centres(lowest, low_scale, outer), centres(a, mid_scale, mid), centres(b, high_scale, outer)])


def _binned_histogram(values: np.ndarray, sample_weight: np.ndarray | None, grid: np.ndarray) -> Binned:
    bins = 2 * int(grid[6]) + int(grid[7])
    with numba_threads():
        table = kernels.bin_statistics(values, sample_weight, grid, bins, chunks_for(values.size))
    occupied = np.flatnonzero(table[:, 0] > 0)
    stats = BinStats(*(np.ascontiguousarray(table[occupied, column]) for column in range(3)))
    return Binned(stats, occupied, bins, grid=grid, raw_centres=_grid_centres(grid))


def distinct_values(values: np.ndarray, sample_weight: np.ndarray | None) -> Binned:
    """One bin per distinct value: the DP on these gives the true optimum."""
    uniq, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(-1)
    x = values.astype(np.float64)
    w = np.ones_like(x) if sample_weight is None else sample_weight.astype(np.float64)
    weight = np.bincount(inverse, weights=w, minlength=uniq.size)
    total = np.bincount(inverse, weights=w * x, minlength=uniq.size)
    total_sq = np.bincount(inverse, weights=w * x * x, minlength=uniq.size)
    occupied = np.flatnonzero(weight > 0)
    stats = BinStats(weight[occupied], total[occupied], total_sq[occupied])
    return Binned(stats, occupied, uniq.size, raw_centres=uniq.astype(np.float64), inverse=inverse)


class Prefix:
    """Prefix sums over bins, centred on the overall mean for precision."""

    def __init__(self, stats: BinStats) -> None:
        shift = float(stats.total.sum() / stats.weight.sum())
        centred_sq = stats.total_sq - 2 * shift * stats.total + shift * shift * stats.weight
        self.shift = shift
        self.p0 = np.concatenate([[0.0], np.cumsum(stats.weight)])
        self.p1 = np.concatenate([[0.0], np.cumsum(stats.total - shift * stats.weight)])
        self.p2 = np.concatenate([[0.0], np.cumsum(centred_sq)])

    def sse(self, bounds: np.ndarray) -> float:
        """Total weighted SSE of the groups of bins between consecutive ``bounds``."""
        return float(kernels.total_cost(self.p0, self.p1, self.p2, bounds.astype(np.int64)))

    def means(self, bounds: np.ndarray) -> np.ndarray:
        """Weighted mean of each group."""
        w = self.p0[bounds[1:]] - self.p0[bounds[:-1]]
        s = self.p1[bounds[1:]] - self.p1[bounds[:-1]]
        return s / w + self.shift


def optimal_groups(stats: BinStats, k: int) -> np.ndarray:
    """Split the bins into k contiguous non-empty groups of minimum weighted SSE (the exact DP).

    Returns the k+1 group boundaries as bin indices (0, ..., number of bins).
    """
    if not 1 <= k <= stats.size:
        raise ValueError(f"k={k} must be between 1 and the number of non-empty bins {stats.size}")
    prefix = Prefix(stats)
    return _dp(prefix.p0, prefix.p1, prefix.p2, k)


def _dp(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, k: int) -> np.ndarray:
    # Row j's Knuth sweep evaluates about m / j**2 splits per end, divide and conquer about log2(m): switch
    # where the first becomes the smaller (at m = 8,192 both 16 and 32 measure as well as this 25).
    m = p0.size - 1
    knuth_from = int(np.ceil(np.sqrt(m / max(1.0, np.log2(m)))))
    return kernels.optimal_bounds(p0, p1, p2, k, max(2, knuth_from))


def near_optimal_groups(stats: BinStats, k: int, prefix: Prefix | None = None) -> np.ndarray:
    """Groups of bins for k centroids: the exact DP when the bins are few, else coarse DP, banded
    refinement on the bins and Lloyd polish (see the module docstring). Returns k+1 boundaries.
    ``prefix``: the bins' prefix sums when the caller has them."""
    m = stats.size
    cells = coarse_cells(k)
    prefix = prefix or Prefix(stats)
    if m <= cells:
        bounds = _dp(prefix.p0, prefix.p1, prefix.p2, k)
    else:
        edges = _cell_edges(stats.means, cells)
        if edges.size - 1 < 2 * k:  # crowded by far outliers: the grid over where the mass is
            edges = _robust_cell_edges(stats, cells)
        coarse = _dp(prefix.p0[edges], prefix.p1[edges], prefix.p2[edges], k)
        bounds = _refine_in_bands(prefix, edges, edges[coarse])
    bin_means = stats.means - prefix.shift
    return kernels.lloyd_bounds(prefix.p0, prefix.p1, prefix.p2, bin_means, bounds, MAX_LLOYD_ITERATIONS)


def _cell_edges(bin_means: np.ndarray, cells: int) -> np.ndarray:
    """First bin of each non-empty cell of a uniform grid over the bin means, then the number of bins."""
    lo, hi = float(bin_means[0]), float(bin_means[-1])
    cell = np.minimum(((bin_means - lo) * (cells / (hi - lo))).astype(np.int64), cells - 1)
    return np.concatenate([[0], np.flatnonzero(np.diff(cell)) + 1, [bin_means.size]])


def _robust_cell_edges(stats: BinStats, cells: int) -> np.ndarray:
    """Cell edges of a uniform grid between the bin means at weight quantiles TAIL and 1 - TAIL, with
    each bin outside that range a cell of its own (so far outliers neither stretch the grid nor share a
    cell with the bulk)."""
    means = stats.means
    mass = np.cumsum(stats.weight) / stats.weight.sum()
    lo = means[min(means.size - 1, int(np.searchsorted(mass, ROBUST_TAIL)))]
    hi = means[min(means.size - 1, int(np.searchsorted(mass, 1 - ROBUST_TAIL)))]
    position = (means - lo) * (cells / (hi - lo)) if hi > lo else np.zeros_like(means)
    index = np.arange(means.size)
    cell = np.where(position < 0, index - means.size, np.where(position >= cells, cells + index,
                                                               np.floor(position)))
    return np.concatenate([[0], np.flatnonzero(np.diff(cell)) + 1, [means.size]])


def _refine_in_bands(prefix: Prefix, edges: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Banded DP on the fine bins around ``bounds`` (bin indices on cell edges), re-centred on the result
    while some group edge stops at the edge of its band."""
    m = int(edges[-1])
    last_cell = edges.size - 1
    cell_of = np.searchsorted(edges, bounds)
    for _ in range(MAX_BAND_ROUNDS):
        lo = np.maximum(edges[np.maximum(cell_of - BAND_REACH_CELLS, 0)], 1)
        hi = np.minimum(edges[np.minimum(cell_of + BAND_REACH_CELLS, last_cell)], m - 1)
        lo[0], hi[0], lo[-1], hi[-1] = 0, 0, m, m
        bounds = kernels.banded_bounds(prefix.p0, prefix.p1, prefix.p2, lo, hi)
        stopped = ((bounds == lo) & (lo > 1)) | ((bounds == hi) & (hi < m - 1))
        if not stopped[1:-1].any():
            break
        cell_of = np.searchsorted(edges, bounds)
    return bounds


def fit_binned(values: np.ndarray, binned: Binned, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Centroids (sorted, float32 as stored), per-value assignments, and the SSE of those."""
    prefix = Prefix(binned.stats)
    bounds = near_optimal_groups(binned.stats, k, prefix)
    means = prefix.means(bounds)
    centroids = means.astype(np.float32)
    group_of_bin = np.repeat(np.arange(k), np.diff(bounds))
    # Each group's SSE around its float64 mean, plus what rounding that mean to float32 adds.
    weights = prefix.p0[bounds[1:]] - prefix.p0[bounds[:-1]]
    rounding = float(np.sum(weights * (centroids.astype(np.float64) - means) ** 2))
    return centroids, binned.assign(values, group_of_bin, centroids), prefix.sse(bounds) + rounding


def true_optimum(values: np.ndarray, k: int, sample_weight: np.ndarray | None = None) -> float:
    """The minimum weighted SSE over all k-clusterings of ``values``: the exact DP on every distinct value
    (O(k * distinct) memory; a reference for tests and benchmarks, not for large layers)."""
    binned = distinct_values(values, sample_weight)
    return Prefix(binned.stats).sse(optimal_groups(binned.stats, k))


def assign_nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value; ``centroids`` must be sorted ascending."""
    midpoints = (centroids[1:] + centroids[:-1]) / 2
    out = np.empty(values.size, dtype=np.uint8 if centroids.size <= 256 else np.int32)
    for start in range(0, values.size, VALUES_PER_CHUNK):
        part = slice(start, start + VALUES_PER_CHUNK)
        out[part] = np.searchsorted(midpoints, values[part].astype(np.float64), side="left")
    return out
