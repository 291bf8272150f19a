"""Bit-packing of codebook indices: ``count`` indices of ``bits`` bits each in ceil(count * bits / 8) bytes.

Bit order (little-endian, the same as ``np.packbits(..., bitorder="little")`` of each index's bits written
least significant bit first): index ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, its
least significant bit first, and stream bit ``j`` is bit ``j % 8`` (bit 0 = least significant) of byte
``j // 8``. For ``bits=4``, byte 0 is ``idx[0] | idx[1] << 4``; for ``bits=8`` the bytes are the indices;
for ``bits=16`` each index is two bytes, low byte first. Unused high bits of the last byte are zero.
``bits=0`` (a codebook with one centroid) takes zero bytes: every index is 0 and the count is kept by
whoever stores the packed bytes (the artifact's header).

Both directions work on chunks of ``CHUNK_ELEMENTS`` indices, so packing a 138M-element layer needs a few
tens of MB of temporaries beyond the input and the output, not gigabytes.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_BITS = 16
"""Widest index supported (k <= 65536 centroids)."""

CHUNK_ELEMENTS = 1 << 20
"""Indices handled per vectorized step; a multiple of 8, so every chunk starts on a byte boundary."""

_LE_U64 = np.dtype("<u8")
_LE_U16 = np.dtype("<u2")


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes taken by ``count`` bit-packed indices of ``bits`` bits: ceil(count * bits / 8)."""
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


def pack_indices(indices: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """Pack integer ``indices`` (any shape, flattened in C order) into a 1-D uint8 array.

    Returns exactly ``ceil(indices.size * bits / 8)`` bytes in the bit order described in the module
    docstring. Raises ValueError when ``bits`` is outside 0..16 or an index is negative or >= 2**bits,
    TypeError when the indices are not integers.
    """
    _check_bits(bits)
    flat = _as_flat_numpy(indices)
    if flat.dtype.kind not in "iub":
        raise TypeError(f"indices must be integers, got dtype {flat.dtype}")
    count = int(flat.size)
    out = np.empty(packed_nbytes(count, bits), dtype=np.uint8)
    if bits == 0:
        for start in range(0, count, CHUNK_ELEMENTS):
            _check_range(flat[start : start + CHUNK_ELEMENTS], bits, start)
        return out
    bytes_per_chunk = CHUNK_ELEMENTS * bits // 8
    for chunk_no, start in enumerate(range(0, count, CHUNK_ELEMENTS)):
        chunk = flat[start : start + CHUNK_ELEMENTS]
        _check_range(chunk, bits, start)
        first = chunk_no * bytes_per_chunk
        last = first + packed_nbytes(chunk.size, bits)
        if bits == 8:
            out[first:last] = chunk
        elif bits == 16:
            out[first:last].view(_LE_U16)[:] = chunk
        else:
            out[first:last] = _pack_chunk(chunk, bits)[: last - first]
    return out


def unpack_indices(
    packed: np.ndarray | torch.Tensor | bytes, bits: int, count: int, *, dtype: np.dtype | type = np.int64
) -> np.ndarray:
    """Inverse of :func:`pack_indices`: a 1-D array of ``count`` indices (int64 unless ``dtype`` is given).

    ``packed`` must hold exactly ``ceil(count * bits / 8)`` bytes (ValueError otherwise). ``dtype`` lets a
    caller ask for a narrower integer type (e.g. uint8 for bits <= 8) to save memory on large layers.
    """
    _check_bits(bits)
    if isinstance(packed, (bytes, bytearray, memoryview)):
        buf = np.frombuffer(packed, dtype=np.uint8)
    else:
        buf = _as_flat_numpy(packed)
        if buf.dtype != np.uint8:
            raise TypeError(f"packed indices must be uint8 bytes, got dtype {buf.dtype}")
    expected = packed_nbytes(count, bits)
    if buf.size != expected:
        raise ValueError(
            f"{count} indices of {bits} bits take {expected} bytes, but {buf.size} bytes were given"
        )
    out_dtype = np.dtype(dtype)
    if out_dtype.kind not in "iu":
        raise TypeError(f"dtype must be an integer type, got {out_dtype}")
    if bits > 0 and (1 << bits) - 1 > np.iinfo(out_dtype).max:
        raise ValueError(f"dtype {out_dtype} cannot hold {bits}-bit indices")
    out = np.empty(count, dtype=out_dtype)
    if bits == 0:
        out.fill(0)
        return out
    bytes_per_chunk = CHUNK_ELEMENTS * bits // 8
    for chunk_no, start in enumerate(range(0, count, CHUNK_ELEMENTS)):
        n = min(CHUNK_ELEMENTS, count - start)
        first = chunk_no * bytes_per_chunk
        chunk = buf[first : first + packed_nbytes(n, bits)]
        if bits == 8:
            out[start : start + n] = chunk
        elif bits == 16:
            out[start : start + n] = chunk.view(_LE_U16)
        else:
            out[start : start + n] = _unpack_chunk(chunk, bits, n)
    return out


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 0..{MAX_BITS}, got {bits!r}")


def _as_flat_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        x = x.numpy()
    return np.asarray(x).reshape(-1)


def _check_range(chunk: np.ndarray, bits: int, offset: int) -> None:
    if chunk.size == 0:
        return
    limit = 1 << bits
    lo = chunk.min()
    hi = chunk.max()
    if lo < 0 or hi >= limit:
        bad = int(np.flatnonzero((chunk < 0) | (chunk >= limit))[0])
        raise ValueError(
            f"index {int(chunk[bad])} at position {offset + bad} does not fit in {bits} bits "
            f"(valid range 0..{limit - 1})"
        )


def _pack_chunk(chunk: np.ndarray, bits: int) -> np.ndarray:
    """Pack up to CHUNK_ELEMENTS validated indices; returns ceil(len/8) * bits bytes (zero-padded).

    Every group of 8 indices is 8 * bits bits = ``bits`` bytes: the group is assembled in one (bits <= 8)
    or two (bits <= 16) little-endian 64-bit words and the first ``bits`` bytes of those words are kept.
    """
    n = chunk.size
    groups = (n + 7) // 8
    values = np.zeros(groups * 8, dtype=np.uint64)
    values[:n] = chunk
    values = values.reshape(groups, 8)
    n_words = 1 if bits <= 8 else 2
    words = np.zeros((groups, n_words), dtype=_LE_U64)
    for j in range(8):
        word, shift = divmod(j * bits, 64)
        column = values[:, j]
        words[:, word] |= column << np.uint64(shift)
        if shift + bits > 64:  # straddles two words (only when bits > 8)
            words[:, word + 1] |= column >> np.uint64(64 - shift)
    return np.ascontiguousarray(words.view(np.uint8).reshape(groups, 8 * n_words)[:, :bits]).reshape(-1)


def _unpack_chunk(chunk: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack_chunk` for ``n`` indices stored in ``chunk`` (ceil(n * bits / 8) bytes)."""
    groups = (n + 7) // 8
    n_words = 1 if bits <= 8 else 2
    raw = np.zeros((groups, 8 * n_words), dtype=np.uint8)
    padded = np.zeros(groups * bits, dtype=np.uint8)
    padded[: chunk.size] = chunk
    raw[:, :bits] = padded.reshape(groups, bits)
    words = raw.view(_LE_U64)
    mask = np.uint64((1 << bits) - 1)
    values = np.empty((groups, 8), dtype=np.uint64)
    for j in range(8):
        word, shift = divmod(j * bits, 64)
        column = words[:, word] >> np.uint64(shift)
        if shift + bits > 64:
            column |= words[:, word + 1] << np.uint64(64 - shift)
        values[:, j] = column & mask
    return values.reshape(-1)[:n]
