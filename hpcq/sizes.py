"""Size accounting of a (partly) quantized model: fp32, bit-packed and entropy-coded payload bytes.

All sizes are sizes of the *payload* (tensor data, codebooks, code tables), not of a particular file:
a container's own header, names and alignment padding are not counted, so the numbers are comparable
across formats and with the paper. The rules, per state-dict entry:

- **fp32** (the baseline): every floating-point tensor at 4 bytes per element, whatever its stored dtype;
  every other tensor (e.g. BatchNorm's int64 ``num_batches_tracked``) at its own element size.
- **bit-packed**: as fp32, except a quantized parameter of ``n`` elements and ``k`` centroids costs
  ``ceil(n * bits / 8)`` bytes of indices (``bits = ceil(log2 k)``, 0 for k = 1) plus ``4 * k`` bytes of
  float32 codebook.
- **entropy-coded**: as bit-packed, except the indices are Huffman-coded with a code built from the
  layer's own index histogram: ``ceil(sum_i count_i * len_i / 8)`` bytes, plus a code table of one byte
  (a code length) per centroid. With a single used centroid no index bits are needed at all.

Reductions are ``100 * (1 - size / fp32)`` percent. An entry that is the very tensor of an earlier entry
(tied weights: one parameter under two names) is stored once and counted once, under the earlier name.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hpcq.qtensor import QuantizedTensor

FP32_BYTES = 4
CODE_TABLE_BYTES_PER_CENTROID = 1
_BINCOUNT_CHUNK = 1 << 24


def huffman_code_lengths(counts: np.ndarray) -> np.ndarray:
    """Code length in bits of every symbol of an optimal (Huffman) prefix code for ``counts``.

    ``counts`` is a 1-D array of non-negative symbol frequencies. Returns an int64 array of the same
    length. Symbols with count 0 get length 0 (they are never coded). When at most one symbol is used, its
    length is 0 as well: the decoder knows the only symbol from the code table, so no bits are needed.
    Otherwise the lengths satisfy Kraft's equality (sum 2**-len == 1) and minimise sum(count * len).
    Ties are broken deterministically (by weight, then by creation order).
    """
    counts = np.asarray(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be 1-D, got shape {tuple(counts.shape)}")
    if counts.size and (counts.dtype.kind not in "iuf" or counts.min() < 0):
        raise ValueError("counts must be non-negative numbers")
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts > 0)
    if used.size <= 1:
        return lengths
    # Nodes 0..m-1 are the used symbols; internal nodes are appended as they are created.
    weights = counts[used].tolist()
    parent = [-1] * (2 * used.size - 1)
    heap = [(w, node) for node, w in enumerate(weights)]
    heapq.heapify(heap)
    next_node = used.size
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_node
        heapq.heappush(heap, (w1 + w2, next_node))
        next_node += 1
    # Parents are created after their children, so walking from the root down fills every depth.
    depth = [0] * next_node
    for node in range(next_node - 2, -1, -1):
        depth[node] = depth[parent[node]] + 1
    lengths[used] = depth[: used.size]
    return lengths


def index_histogram(qt: QuantizedTensor) -> np.ndarray:
    """How often each of the ``qt.k`` centroids is used (int64, length k); counted in chunks."""
    flat = qt.indices.detach().reshape(-1)
    k = qt.k
    counts = torch.zeros(k, dtype=torch.int64)
    for start in range(0, flat.numel(), _BINCOUNT_CHUNK):
        chunk = flat[start : start + _BINCOUNT_CHUNK].cpu().long()
        if chunk.numel() and (int(chunk.min()) < 0 or int(chunk.max()) >= k):
            raise ValueError(f"indices must lie in [0, {k}), found values outside it")
        counts += torch.bincount(chunk, minlength=k)
    return counts.numpy()


def huffman_index_bytes(qt: QuantizedTensor) -> int:
    """Bytes of the Huffman-coded indices of ``qt`` (without code table or codebook)."""
    counts = index_histogram(qt)
    total_bits = int(np.dot(counts, huffman_code_lengths(counts)))
    return (total_bits + 7) // 8


@dataclass(frozen=True)
class TensorSize:
    """Payload sizes of one state-dict entry; ``k`` and ``bits`` are None when it is not quantized."""

    name: str
    numel: int
    k: int | None
    bits: int | None
    fp32_bytes: int
    bitpacked_bytes: int
    entropy_coded_bytes: int

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return asdict(self)


@dataclass(frozen=True)
class SizeReport:
    """Payload sizes of a whole model (see the module docstring for what is counted)."""

    fp32_bytes: int
    bitpacked_bytes: int
    entropy_coded_bytes: int
    reduction_bitpacked_pct: float
    reduction_entropy_pct: float

    @classmethod
    def from_bytes(cls, fp32_bytes: int, bitpacked_bytes: int, entropy_coded_bytes: int) -> SizeReport:
        """Build a report, computing the reductions ``100 * (1 - size / fp32)`` (0 for an empty model)."""
        return cls(
            fp32_bytes=fp32_bytes,
            bitpacked_bytes=bitpacked_bytes,
            entropy_coded_bytes=entropy_coded_bytes,
            reduction_bitpacked_pct=_reduction(bitpacked_bytes, fp32_bytes),
            reduction_entropy_pct=_reduction(entropy_coded_bytes, fp32_bytes),
        )

    def to_dict(self) -> dict:
        """A JSON-ready dict of the fields."""
        return asdict(self)


def shared_entries(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Entries that are the same tensor as an earlier entry (same memory, shape and strides): name -> the
    earlier entry's name. A module registered twice, or tied weights, show up this way."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            continue
        key = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        owner = first.setdefault(key, name)
        if owner != name:
            aliases[name] = owner
    return aliases


def per_tensor_sizes(
    state_dict: Mapping[str, torch.Tensor],
    quantized: Mapping[str, QuantizedTensor],
    *,
    include_unquantized: bool = True,
) -> list[TensorSize]:
    """One :class:`TensorSize` row per state-dict entry, in state-dict order (payload sizes); an entry that
    shares its tensor with an earlier one (see :func:`shared_entries`) gets no row of its own.

    Every name in ``quantized`` must be a state-dict entry of the same shape (ValueError otherwise). With
    ``include_unquantized=False`` only the quantized entries are listed.
    """
    check_quantized_names(state_dict, quantized)
    aliases = shared_entries(state_dict)
    rows = []
    for name, tensor in state_dict.items():
        if name in aliases:
            continue
        numel = int(tensor.numel())
        fp32 = numel * (FP32_BYTES if tensor.is_floating_point() else tensor.element_size())
        qt = quantized.get(name)
        if qt is None:
            if include_unquantized:
                rows.append(TensorSize(name, numel, None, None, fp32, fp32, fp32))
            continue
        codebook = FP32_BYTES * qt.k
        bitpacked = (numel * qt.bits + 7) // 8 + codebook
        entropy = huffman_index_bytes(qt) + CODE_TABLE_BYTES_PER_CENTROID * qt.k + codebook
        rows.append(TensorSize(name, numel, qt.k, qt.bits, fp32, bitpacked, entropy))
    return rows


def model_sizes(
    state_dict: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedTensor]
) -> SizeReport:
    """Payload sizes of the model whose state dict is ``state_dict`` with ``quantized`` entries replaced
    by codebooks and indices (the sum of :func:`per_tensor_sizes`)."""
    rows = per_tensor_sizes(state_dict, quantized)
    return SizeReport.from_bytes(
        sum(r.fp32_bytes for r in rows),
        sum(r.bitpacked_bytes for r in rows),
        sum(r.entropy_coded_bytes for r in rows),
    )


def _reduction(size: int, fp32: int) -> float:
    return 0.0 if fp32 == 0 else 100.0 * (1.0 - size / fp32)


def check_quantized_names(
    state_dict: Mapping[str, torch.Tensor], quantized: Mapping[str, QuantizedTensor]
) -> None:
    """ValueError unless every quantized tensor names a state-dict entry of the same shape, and not a
    second name of a tensor listed earlier (tied weights are quantized under their first name)."""
    missing = [name for name in quantized if name not in state_dict]
    if missing:
        raise ValueError(
            f"quantized tensors not in the state dict: {missing[:5]}"
            + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        )
    aliases = shared_entries(state_dict)
    for name, qt in quantized.items():
        if name in aliases:
            raise ValueError(f"{name} is the same tensor as {aliases[name]}: quantize it under that name")
        if tuple(qt.shape) != tuple(state_dict[name].shape):
            raise ValueError(
                f"quantized tensor {name!r} has shape {tuple(qt.shape)} but the state dict entry has "
                f"shape {tuple(state_dict[name].shape)}"
            )


__all__ = [
    "SizeReport",
    "TensorSize",
    "check_quantized_names",
    "huffman_code_lengths",
    "huffman_index_bytes",
    "index_histogram",
    "model_sizes",
    "per_tensor_sizes",
    "shared_entries",
]
