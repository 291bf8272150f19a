"""Payload size accounting and Huffman code lengths."""

import heapq
import math

import numpy as np
import pytest
import torch

from hpcq.qtensor import QuantizedTensor
from hpcq.sizes import (
    SizeReport,
    huffman_code_lengths,
    huffman_index_bytes,
    model_sizes,
    per_tensor_sizes,
)


def qtensor(k: int, shape, *, indices=None, seed=0) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    if indices is None:
        indices = torch.randint(0, k, shape, generator=gen)
    return QuantizedTensor(codebook=torch.sort(torch.randn(k, generator=gen)).values, indices=indices)


def entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def huffman_cost(counts) -> int:
    """Optimal prefix-code cost computed independently: the sum of all merged weights."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) <= 1:
        return 0
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        cost += merged
        heapq.heappush(heap, merged)
    return cost


# --- Huffman ---------------------------------------------------------------------------------------------


def test_huffman_known_example():
    assert huffman_code_lengths(np.array([1, 1, 2, 4])).tolist() == [3, 3, 2, 1]
    assert huffman_code_lengths(np.array([5, 5])).tolist() == [1, 1]
    assert sorted(huffman_code_lengths(np.array([1, 1, 1, 1])).tolist()) == [2, 2, 2, 2]


@pytest.mark.parametrize("seed", range(20))
def test_huffman_kraft_equality_and_entropy_bounds(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 300))
    # skewed, sometimes with unused symbols
    counts = rng.geometric(rng.uniform(0.01, 0.5), size=k) * (rng.random(k) > 0.2)
    counts[:2] = np.maximum(counts[:2], 1)  # at least two used symbols
    lengths = huffman_code_lengths(counts)
    used = counts > 0
    assert (lengths[~used] == 0).all()
    assert (lengths[used] >= 1).all()
    assert sum(2.0 ** -int(n) for n in lengths[used]) == pytest.approx(1.0, abs=1e-12)  # Kraft equality
    avg = float((counts * lengths).sum() / counts.sum())
    h = entropy_bits(counts)
    assert h - 1e-9 <= avg < h + 1
    assert int((counts * lengths).sum()) == huffman_cost(counts)  # optimal


def test_huffman_single_used_symbol_needs_no_bits():
    assert huffman_code_lengths(np.array([0, 17, 0])).tolist() == [0, 0, 0]
    assert huffman_code_lengths(np.array([42])).tolist() == [0]
    assert huffman_code_lengths(np.zeros(4, dtype=np.int64)).tolist() == [0, 0, 0, 0]
    assert huffman_code_lengths(np.array([], dtype=np.int64)).tolist() == []


def test_huffman_rejects_bad_counts():
    with pytest.raises(ValueError):
        huffman_code_lengths(np.array([1, -1, 3]))
    with pytest.raises(ValueError):
        huffman_code_lengths(np.ones((2, 2)))


# --- model sizes --------------------------------------------------------------------------------------


def test_hand_checkable_example():
    weight = torch.randn(1000)
    bias = torch.randn(10)
    steps = torch.tensor(3, dtype=torch.int64)
    state = {"w": weight, "b": bias, "steps": steps}
    # 4 centroids used equally often -> Huffman gives 2 bits each: 2000 bits = 250 bytes
    indices = torch.arange(1000) % 4
    report = model_sizes(state, {"w": qtensor(4, (1000,), indices=indices)})
    fp32 = 1000 * 4 + 10 * 4 + 8
    assert report.fp32_bytes == fp32
    assert report.bitpacked_bytes == 250 + 16 + 40 + 8
    assert report.entropy_coded_bytes == 250 + 4 + 16 + 40 + 8
    assert report.reduction_bitpacked_pct == pytest.approx(100 * (1 - (250 + 16 + 48) / fp32))
    assert report.reduction_entropy_pct == pytest.approx(100 * (1 - (250 + 4 + 16 + 48) / fp32))


def test_skewed_histogram_entropy_coding_beats_bitpacking():
    indices = torch.zeros(1000, dtype=torch.int64)
    indices[:10] = torch.arange(10) % 8  # almost every index is 0
    qt = qtensor(8, (1000,), indices=indices)
    (row,) = per_tensor_sizes({"w": torch.zeros(1000)}, {"w": qt})
    assert row.bitpacked_bytes == 375 + 32
    assert row.entropy_coded_bytes < row.bitpacked_bytes
    assert row.entropy_coded_bytes == huffman_index_bytes(qt) + 8 + 32


def test_single_centroid_costs_only_codebook_and_table():
    state = {"b": torch.randn(64)}
    report = model_sizes(state, {"b": qtensor(1, (64,))})
    assert (report.fp32_bytes, report.bitpacked_bytes, report.entropy_coded_bytes) == (256, 4, 5)


def test_fp16_counts_as_fp32_and_integer_buffers_at_their_size():
    state = {
        "h": torch.zeros(10, dtype=torch.float16),
        "i": torch.zeros(10, dtype=torch.int32),
        "u": torch.zeros(10, dtype=torch.uint8),
    }
    report = model_sizes(state, {})
    assert report.fp32_bytes == report.bitpacked_bytes == report.entropy_coded_bytes == 40 + 40 + 10
    assert report.reduction_bitpacked_pct == 0.0


def test_rows_sum_to_report_and_match_formula():
    rng = np.random.default_rng(3)
    state, quantized = {}, {}
    for i, k in enumerate([1, 2, 5, 32, 256, 1000]):
        shape = (int(rng.integers(1, 50)), int(rng.integers(1, 50)))
        state[f"l{i}.weight"] = torch.randn(shape)
        state[f"l{i}.bias"] = torch.randn(shape[0])
        quantized[f"l{i}.weight"] = qtensor(k, shape, seed=i)
    rows = per_tensor_sizes(state, quantized)
    assert [r.name for r in rows] == list(state)
    report = model_sizes(state, quantized)
    assert report.fp32_bytes == sum(r.fp32_bytes for r in rows)
    assert report.bitpacked_bytes == sum(r.bitpacked_bytes for r in rows)
    assert report.entropy_coded_bytes == sum(r.entropy_coded_bytes for r in rows)
    for r in rows:
        if r.k is None:
            assert r.fp32_bytes == r.bitpacked_bytes == r.entropy_coded_bytes == 4 * r.numel
        else:
            assert r.bits == (0 if r.k == 1 else math.ceil(math.log2(r.k)))
            assert r.bitpacked_bytes == math.ceil(r.numel * r.bits / 8) + 4 * r.k
            # Huffman is never worse than fixed-length codes (plus the 1-byte-per-centroid table)
            assert r.entropy_coded_bytes <= r.bitpacked_bytes + r.k
    only_q = per_tensor_sizes(state, quantized, include_unquantized=False)
    assert [r.name for r in only_q] == list(quantized)
    assert report.reduction_bitpacked_pct == pytest.approx(
        100 * (1 - report.bitpacked_bytes / report.fp32_bytes)
    )


def test_to_dict_and_empty_model():
    report = SizeReport.from_bytes(0, 0, 0)
    assert report.to_dict() == {
        "fp32_bytes": 0,
        "bitpacked_bytes": 0,
        "entropy_coded_bytes": 0,
        "reduction_bitpacked_pct": 0.0,
        "reduction_entropy_pct": 0.0,
    }
    assert model_sizes({}, {}) == report
    (row,) = per_tensor_sizes({"w": torch.zeros(4)}, {"w": qtensor(2, (4,))})
    assert row.to_dict()["k"] == 2


def test_quantized_name_or_shape_not_in_state_dict_raises():
    with pytest.raises(ValueError, match="not in the state dict"):
        model_sizes({"w": torch.zeros(4)}, {"v": qtensor(2, (4,))})
    with pytest.raises(ValueError, match="shape"):
        model_sizes({"w": torch.zeros(4)}, {"w": qtensor(2, (5,))})


def test_out_of_range_indices_raise():
    bad = QuantizedTensor(codebook=torch.zeros(2), indices=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        model_sizes({"w": torch.zeros(3)}, {"w": bad})
