"""Codebook fitting: optimality of the exact method, properties, both backends, errors."""

import itertools

import numpy as np
import pytest
import torch

from hpcq.errors import QuantizationError
from hpcq.kmeans import exact, fit_codebook, kernels, weighted_sse


def brute_force_sse(values: np.ndarray, k: int, weights: np.ndarray | None = None) -> float:
    order = np.argsort(values)
    x = values[order].astype(np.float64)
    w = np.ones_like(x) if weights is None else weights[order].astype(np.float64)
    best = np.inf
    for cuts in itertools.combinations(range(1, x.size), k - 1):
        bounds = [0, *cuts, x.size]
        total = 0.0
        for a, b in itertools.pairwise(bounds):
            mean = np.average(x[a:b], weights=w[a:b])
            total += float((w[a:b] * (x[a:b] - mean) ** 2).sum())
        best = min(best, total)
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_exact_is_optimal_on_small_inputs(k):
    rng = np.random.default_rng(k)
    values = rng.standard_normal(11).astype(np.float32)
    assert fit_codebook(values, k).sse == pytest.approx(brute_force_sse(values, k), rel=1e-9, abs=1e-9)


def test_exact_is_optimal_with_sample_weights():
    rng = np.random.default_rng(7)
    values = rng.standard_normal(10).astype(np.float32)
    weights = rng.uniform(0.1, 5.0, 10).astype(np.float32)
    fit = fit_codebook(values, 3, sample_weight=weights)
    assert fit.sse == pytest.approx(brute_force_sse(values, 3, weights), rel=1e-6)
    # Heavier weights pull centroids: the weighted fit differs from the unweighted one.
    assert not np.allclose(fit.centroids, fit_codebook(values, 3).centroids)


def test_histogram_path_is_close_to_the_true_optimum():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(50_000).astype(np.float32)
    for k in (4, 32, 128):
        optimum = exact.true_optimum(values, k)
        fit = fit_codebook(values, k, bins=4096)  # 50k values > 4096 bins: histogram path
        assert optimum <= fit.sse <= optimum * 1.001


def test_more_centroids_never_raise_sse_and_at_most_k_values():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.standard_normal(20_000), rng.laplace(size=20_000) * 0.1]).astype(np.float32)
    previous = np.inf
    for k in (1, 2, 3, 4, 8, 16, 32, 64, 128, 256):
        fit = fit_codebook(values, k)
        assert fit.sse <= previous * (1 + 1e-9)
        previous = fit.sse
        assert fit.centroids.size == k and np.all(np.diff(fit.centroids) > 0)
        assert np.unique(fit.centroids[fit.assignments]).size <= k
        assert fit.sse == pytest.approx(weighted_sse(values, None, fit.centroids, fit.assignments), rel=1e-6)


def test_k1_is_the_mean_and_k_equal_distinct_is_lossless():
    values = np.array([3.0, 1.0, 2.0, 2.0, 1.0], dtype=np.float32)
    one = fit_codebook(values, 1)
    assert one.centroids[0] == pytest.approx(values.mean()) and one.assignments.max() == 0
    full = fit_codebook(values, 3)
    assert full.sse == pytest.approx(0.0, abs=1e-12)
    assert np.array_equal(full.centroids[full.assignments], values)


def test_exact_is_deterministic():
    values = np.random.default_rng(3).standard_normal(100_000).astype(np.float32)
    a, b = fit_codebook(values, 16), fit_codebook(values, 16)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.assignments, b.assignments)


def test_crowded_values_fall_back_to_distinct_values():
    # 6 distinct values, one far outlier: uniform bins put the 5 close ones in one bin.
    values = np.array([0.0, 1e-7, 2e-7, 3e-7, 4e-7, 1.0] * 2000, dtype=np.float32)
    fit = fit_codebook(values, 6, bins=64)
    assert fit.sse == pytest.approx(0.0, abs=1e-9)


def test_faiss_backend_fits_and_is_close_to_exact():
    values = np.random.default_rng(4).standard_normal(20_000).astype(np.float32)
    fit = fit_codebook(values, 16, method="faiss", niter=50, seed=1)
    best = fit_codebook(values, 16)
    assert fit.centroids.size == 16 and np.all(np.diff(fit.centroids) >= 0)
    assert best.sse <= fit.sse <= best.sse * 1.05


@pytest.mark.parametrize(
    ("values", "k", "fragment"),
    [
        (np.array([], dtype=np.float32), 1, "empty"),
        (np.array([1.0, np.nan], dtype=np.float32), 1, "NaN or infinite"),
        (np.array([1.0, np.inf], dtype=np.float32), 1, "NaN or infinite"),
        (np.array([1.0, 2.0, 2.0], dtype=np.float32), 3, "2 distinct values"),
        (np.array([1.0, 2.0], dtype=np.float32), 0, ">= 1"),
    ],
)
def test_bad_inputs_get_clear_errors(values, k, fragment):
    with pytest.raises(QuantizationError, match=fragment):
        fit_codebook(values, k)


def test_bad_method_and_weights():
    values = np.arange(10, dtype=np.float32)
    with pytest.raises(QuantizationError, match="unknown k-means method"):
        fit_codebook(values, 2, method="magic")
    with pytest.raises(QuantizationError, match="sample_weight"):
        fit_codebook(values, 2, sample_weight=np.ones(3, dtype=np.float32))
    with pytest.raises(QuantizationError, match=">= 0"):
        fit_codebook(values, 2, sample_weight=-np.ones(10, dtype=np.float32))


def reference_dp_sse(stats: exact.BinStats, k: int) -> float:
    """The textbook O(k m^2) DP over bins, no monotonicity assumed."""
    prefix = exact.Prefix(stats)
    m = stats.size
    ends = np.arange(m + 1)

    def cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        w = prefix.p0[b] - prefix.p0[a]
        s = prefix.p1[b] - prefix.p1[a]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(b > a, np.maximum(prefix.p2[b] - prefix.p2[a] - s * s / w, 0.0), np.inf)

    row = cost(np.zeros(m + 1, dtype=np.int64), ends)
    for _ in range(2, k + 1):
        row = np.array([np.min(row[:i] + cost(np.arange(i), np.full(i, i))) if i else np.inf for i in ends])
    return float(row[m])


@pytest.mark.parametrize("knuth_from", [2, 5, 10**6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_kernel_matches_the_textbook_dp(knuth_from, seed):
    # Integer-valued weights give many exactly tied costs, where a wrong monotonicity bound shows.
    rng = np.random.default_rng(seed)
    m = 120
    stats = exact.BinStats(
        weight=rng.integers(1, 4, m).astype(np.float64),
        total=np.zeros(m),
        total_sq=np.zeros(m),
    )
    positions = np.cumsum(rng.integers(1, 3, m)).astype(np.float64)
    stats = exact.BinStats(stats.weight, stats.weight * positions, stats.weight * positions**2)
    prefix = exact.Prefix(stats)
    for k in (1, 2, 7, 30, m):
        bounds = kernels.optimal_bounds(prefix.p0, prefix.p1, prefix.p2, k, knuth_from)
        assert bounds[0] == 0 and bounds[-1] == m and np.all(np.diff(bounds) > 0)
        assert prefix.sse(bounds) == pytest.approx(reference_dp_sse(stats, k), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    "draw",
    [
        lambda rng, n: rng.standard_normal(n),
        lambda rng, n: rng.laplace(size=n),
        lambda rng, n: np.concatenate([rng.normal(-1, 0.05, n // 2), rng.normal(2, 0.5, n - n // 2)]),
    ],
    ids=["normal", "laplace", "bimodal"],
)
def test_coarse_dp_with_banded_refinement_is_within_0_1_percent(draw):
    # 300k values, 65,536 bins: far more non-empty bins than coarse cells, so the coarse DP, the banded
    # refinement and the Lloyd polish all run.
    values = draw(np.random.default_rng(5), 300_000).astype(np.float32)
    for k in (3, 16, 64):
        assert exact.histogram(values, None, exact.DEFAULT_BINS).stats.size > exact.coarse_cells(k)
        fit = fit_codebook(values, k)
        optimum = exact.true_optimum(values, k)
        assert optimum <= fit.sse * (1 + 1e-9) and fit.sse <= optimum * 1.001
        assert fit.sse == pytest.approx(weighted_sse(values, None, fit.centroids, fit.assignments), rel=1e-6)


def test_zero_weight_values_go_to_the_nearest_centroid():
    rng = np.random.default_rng(8)
    values = rng.standard_normal(100_000).astype(np.float32)
    weights = np.ones_like(values)
    weights[values > 1.5] = 0.0  # the upper tail does not count
    for bins in (0, 10**6):  # histogram, and one bin per distinct value
        fit = fit_codebook(values, 8, sample_weight=weights, bins=bins)
        assert fit.centroids.max() < 1.5
        nearest = exact.assign_nearest(values, fit.centroids.astype(np.float64))
        tail = values > 1.5
        assert np.array_equal(fit.assignments[tail], nearest[tail])


def test_result_does_not_depend_on_the_number_of_threads():
    values = np.random.default_rng(9).standard_normal(3_000_000).astype(np.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fit_codebook(values, 32)
        torch.set_num_threads(2)
        two = fit_codebook(values, 32)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(one.centroids, two.centroids) and one.sse == two.sse
    assert np.array_equal(one.assignments, two.assignments)


def test_far_outliers_get_their_own_centroids_and_the_bulk_stays_near_optimal():
    # Two far outliers crowd the uniform grid into a few hundred bins; the robust grid spans the bulk.
    values = np.random.default_rng(11).standard_normal(100_000).astype(np.float32)
    values[:2] = (1000.0, -300.0)
    for k in (16, 128):
        assert exact.histogram(values, None, exact.DEFAULT_BINS).stats.size < exact.coarse_cells(k)
        fit = fit_codebook(values, k)
        assert {1000.0, -300.0} <= set(fit.centroids.tolist())
        optimum = exact.true_optimum(values, k)
        assert optimum <= fit.sse * (1 + 1e-9) and fit.sse <= optimum * 1.001
        assert fit.sse == pytest.approx(weighted_sse(values, None, fit.centroids, fit.assignments), rel=1e-6)


def test_too_few_bins_for_k_is_refused():
    with pytest.raises(QuantizationError, match="kmeans.bins=16 is too few for k=256"):
        fit_codebook(np.random.default_rng(0).standard_normal(1000).astype(np.float32), 256, bins=16)
