"""Compiled (numba) inner loops of the exact 1-D k-means: one pass over the values, and the DPs over bins.

Every function takes and returns plain numpy arrays. Prefix sums ``p0, p1, p2`` (length m + 1) are the
cumulative weight, weighted sum and weighted sum of squares of m bins in value order (centred by the
caller for precision); ``group_cost(p0, p1, p2, a, b)`` is the weighted SSE of bins a..b-1 around their
mean. Compiled on first use and cached on disk (``cache=True``), so later processes load them in
milliseconds; ``NUMBA_CACHE_DIR`` moves that cache where the package directory is read-only.
"""

from __future__ import annotations

import numba
import numpy as np

# A D&C stack deeper than this would need more than 2**60 bins.
_STACK_DEPTH = 64


@numba.njit(cache=True, inline="always")
def _bin_of(x, grid):  # noqa: ANN001, ANN202
    """The bin of x on a piecewise uniform grid ``(lowest, a, b, low_scale, mid_scale, high_scale,
    outer_bins, mid_bins)``: ``outer_bins`` bins over [lowest, a), ``mid_bins`` over [a, b], ``outer_bins``
    above b; with a = lowest and b = the largest value it is one uniform grid."""
    lowest, a, b = grid[0], grid[1], grid[2]
    outer, mid = int(grid[6]), int(grid[7])
    if x < a:
        return min(max(int((x - lowest) * grid[3]), 0), outer - 1)
    if x > b:
        return outer + mid + min(max(int((x - b) * grid[5]), 0), outer - 1)
    return outer + min(max(int((x - a) * grid[4]), 0), mid - 1)


@numba.njit(cache=True, parallel=True)
def bin_statistics(values, sample_weight, grid, bins, chunks):  # noqa: ANN001, ANN201
    """(bins, 3) float64: weighted count, sum and sum of squares of the values in each bin of ``grid``
    (see ``_bin_of``; bins = 2 * outer_bins + mid_bins). ``sample_weight`` may be None. The values
    are split into ``chunks`` fixed parts, each summed separately and then added in order, so the result
    does not depend on the number of threads.
    """
    n = values.size
    parts = np.zeros((chunks, bins, 3))
    for c in numba.prange(chunks):
        part = parts[c]
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            x = np.float64(values[i])
            b = _bin_of(x, grid)
            if sample_weight is None:
                part[b, 0] += 1.0
                part[b, 1] += x
                part[b, 2] += x * x
            else:
                w = np.float64(sample_weight[i])
                part[b, 0] += w
                part[b, 1] += w * x
                part[b, 2] += w * x * x
    out = parts[0].copy()
    for c in range(1, chunks):
        out += parts[c]
    return out


@numba.njit(cache=True, parallel=True)
def lookup_bins(values, grid, table, chunks):  # noqa: ANN001, ANN201
    """``table[bin of x]`` for every value x, with the bins of ``bin_statistics`` (len(table) bins)."""
    n = values.size
    out = np.empty(n, dtype=table.dtype)
    for c in numba.prange(chunks):
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            out[i] = table[_bin_of(np.float64(values[i]), grid)]
    return out


@numba.njit(cache=True, inline="always")
def group_cost(p0, p1, p2, a, b):  # noqa: ANN001, ANN201
    """Weighted SSE of bins a..b-1 (a < b) around their weighted mean; never negative."""
    w = p0[b] - p0[a]
    s = p1[b] - p1[a]
    c = p2[b] - p2[a] - s * s / w
    return c if c > 0.0 else 0.0


@numba.njit(cache=True, inline="always")
def _best_split(p0, p1, p2, prev, first, last, end):  # noqa: ANN001, ANN202
    """min over s in first..last of prev[s] + cost(s, end), and the leftmost s attaining it."""
    best, arg = np.inf, first
    for s in range(first, last + 1):
        v = prev[s] + group_cost(p0, p1, p2, s, end)
        if v < best:
            best, arg = v, s
    return best, arg


@numba.njit(cache=True)
def optimal_bounds(p0, p1, p2, k, knuth_from):  # noqa: ANN001, ANN201
    """Boundaries (k + 1 bin indices, 0 .. m) of the k contiguous groups of minimum total SSE.

    ``D[j][i] = min_s D[j-1][s] + cost(s, i)``; the leftmost best split ``opt[j][i]`` is monotone in both
    i and j (the cost satisfies the quadrangle inequality), so each row is found by divide and conquer over
    i with the split range bounded by its neighbours' splits and by ``opt[j-1][i]``; from row
    ``knuth_from`` on, where groups are narrow, a sweep from the last i down with
    ``opt[j-1][i] <= opt[j][i] <= opt[j][i+1]`` evaluates fewer candidates. O(k m) memory for the splits.
    """
    m = p0.size - 1
    prev = np.empty(m + 1)
    prev[0] = np.inf
    for i in range(1, m + 1):
        prev[i] = group_cost(p0, p1, p2, 0, i)
    row = np.full(m + 1, np.inf)
    opt = np.zeros(m + 1, dtype=np.int32)
    prev_opt = np.zeros(m + 1, dtype=np.int32)
    splits = np.zeros((k + 1, m + 1), dtype=np.int32)
    stack = np.empty((_STACK_DEPTH, 4), dtype=np.int64)
    for j in range(2, k + 1):
        first, last = j, m - (k - j)  # group j must end where k - j non-empty groups still fit
        if j >= knuth_from:
            hi_split = last - 1
            for i in range(last, first - 1, -1):
                # prev_opt[last] was never computed (row j-1 ends one earlier); prev_opt[last - 1] bounds it.
                lo_split = max(j - 1, prev_opt[i] if i < last else prev_opt[i - 1])
                best, arg = _best_split(p0, p1, p2, prev, lo_split, min(hi_split, i - 1), i)
                row[i], opt[i] = best, arg
                hi_split = arg
        else:
            stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = first, last, j - 1, last - 1
            top = 1
            while top > 0:
                top -= 1
                lo_i, hi_i, lo_split, hi_split = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
                mid = (lo_i + hi_i) // 2
                a = max(lo_split, prev_opt[mid]) if j > 2 and mid < last else lo_split
                best, arg = _best_split(p0, p1, p2, prev, a, min(hi_split, mid - 1), mid)
                row[mid], opt[mid] = best, arg
                if mid + 1 <= hi_i:
                    stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = mid + 1, hi_i, arg, hi_split
                    top += 1
                if mid - 1 >= lo_i:
                    stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo_i, mid - 1, lo_split, arg
                    top += 1
        prev[first - 1] = np.inf
        for i in range(first, last + 1):
            prev[i] = row[i]
            prev_opt[i] = opt[i]
            splits[j, i] = opt[i]
    bounds = np.zeros(k + 1, dtype=np.int64)
    bounds[k] = m
    for j in range(k, 1, -1):
        bounds[j - 1] = splits[j, bounds[j]]
    return bounds


@numba.njit(cache=True)
def banded_bounds(p0, p1, p2, lo, hi):  # noqa: ANN001, ANN201
    """Minimum-SSE boundaries with boundary g restricted to bins lo[g]..hi[g] (lo[0] = hi[0] = 0,
    lo[k] = hi[k] = m; some strictly increasing choice must exist). O(sum of window products) time."""
    k = lo.size - 1
    offset = np.zeros(k + 2, dtype=np.int64)
    for g in range(k + 1):
        offset[g + 1] = offset[g] + hi[g] - lo[g] + 1
    best_cost = np.full(offset[k + 1], np.inf)
    best_prev = np.zeros(offset[k + 1], dtype=np.int64)
    best_cost[0] = 0.0
    for g in range(1, k + 1):
        for b in range(lo[g], hi[g] + 1):
            best, arg = np.inf, -1
            for a in range(lo[g - 1], min(hi[g - 1], b - 1) + 1):
                before = best_cost[offset[g - 1] + a - lo[g - 1]]
                if before < np.inf:
                    v = before + group_cost(p0, p1, p2, a, b)
                    if v < best:
                        best, arg = v, a
            best_cost[offset[g] + b - lo[g]] = best
            best_prev[offset[g] + b - lo[g]] = arg
    bounds = np.empty(k + 1, dtype=np.int64)
    bounds[k] = hi[k]
    for g in range(k, 0, -1):
        bounds[g - 1] = best_prev[offset[g] + bounds[g] - lo[g]]
    return bounds


@numba.njit(cache=True)
def total_cost(p0, p1, p2, bounds):  # noqa: ANN001, ANN201
    """Total SSE of the groups between consecutive ``bounds``."""
    total = 0.0
    for g in range(bounds.size - 1):
        total += group_cost(p0, p1, p2, bounds[g], bounds[g + 1])
    return total


@numba.njit(cache=True)
def lloyd_bounds(p0, p1, p2, bin_means, bounds, max_iterations):  # noqa: ANN001, ANN201
    """Lloyd iterations over whole bins: each group edge moves to the first bin whose mean lies past the
    midpoint of the two centroids, and the centroids become the new group means. A step is kept only if
    it lowers the SSE; stops when nothing moves. ``bin_means`` must be ascending (centred like p1)."""
    k = bounds.size - 1
    m = p0.size - 1
    current = bounds.copy()
    candidate = bounds.copy()
    centroids = np.empty(k)
    sse = total_cost(p0, p1, p2, current)
    for _ in range(max_iterations):
        for g in range(k):
            centroids[g] = (p1[current[g + 1]] - p1[current[g]]) / (p0[current[g + 1]] - p0[current[g]])
        moved = False
        for g in range(1, k):
            candidate[g] = np.searchsorted(bin_means, (centroids[g - 1] + centroids[g]) / 2)
            moved = moved or candidate[g] != current[g]
        if not moved:
            break
        valid = True
        for g in range(k):
            valid = valid and candidate[g] < candidate[g + 1]
        if not valid or candidate[k] != m:
            break
        new_sse = total_cost(p0, p1, p2, candidate)
        if new_sse >= sse:
            break
        sse = new_sse
        current[:] = candidate
    return current
