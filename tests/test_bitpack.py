"""Bit-packing of codebook indices: round trips, exact sizes, bit order, validation."""

import numpy as np
import pytest
import torch

from hpcq import bitpack
from hpcq.bitpack import pack_indices, packed_nbytes, unpack_indices

SIZES = [0, 1, 2, 7, 8, 9, 15, 17, 63, 64, 65, 1000, 4099]


def reference_pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """The documented bit order, written the slow obvious way: LSB-first bits, little-endian bytes."""
    stream = ((indices.astype(np.int64)[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@pytest.mark.parametrize("bits", range(17))
def test_round_trip_every_width(bits):
    rng = np.random.default_rng(bits)
    for n in [*SIZES, int(rng.integers(1, 5000))]:
        indices = rng.integers(0, 1 << bits, n)
        packed = pack_indices(indices, bits)
        assert packed.dtype == np.uint8 and packed.ndim == 1
        assert packed.size == (n * bits + 7) // 8 == packed_nbytes(n, bits)
        unpacked = unpack_indices(packed, bits, n)
        assert unpacked.dtype == np.int64
        np.testing.assert_array_equal(unpacked, indices)


@pytest.mark.parametrize("bits", [1, 3, 5, 8, 11, 16])
def test_bit_order_matches_reference(bits):
    rng = np.random.default_rng(100 + bits)
    indices = rng.integers(0, 1 << bits, 333)
    np.testing.assert_array_equal(pack_indices(indices, bits), reference_pack(indices, bits))


def test_documented_examples():
    assert pack_indices(np.array([1, 2]), 4).tolist() == [0x21]
    assert pack_indices(np.array([0x1234]), 16).tolist() == [0x34, 0x12]
    # three 3-bit values 0b101, 0b011, 0b111 -> stream bits 101 110 111 (LSB first) -> 0b11_011_101, 0b1
    assert pack_indices(np.array([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]


def test_extreme_values_and_padding_bits_are_zero():
    for bits in range(1, 17):
        n = 13
        indices = np.full(n, (1 << bits) - 1)
        packed = pack_indices(indices, bits)
        np.testing.assert_array_equal(unpack_indices(packed, bits, n), indices)
        used = n * bits % 8
        if used:
            assert packed[-1] >> used == 0


@pytest.mark.parametrize("bits", [0, 2, 5, 8, 12, 16])
def test_chunk_boundaries(monkeypatch, bits):
    monkeypatch.setattr(bitpack, "CHUNK_ELEMENTS", 64)
    rng = np.random.default_rng(7)
    for n in [63, 64, 65, 128, 200, 1001]:
        indices = rng.integers(0, 1 << bits, n)
        packed = pack_indices(indices, bits)
        np.testing.assert_array_equal(packed, reference_pack(indices, bits))
        np.testing.assert_array_equal(unpack_indices(packed, bits, n), indices)


def test_bits_zero_takes_no_bytes():
    packed = pack_indices(np.zeros(1000, dtype=np.int64), 0)
    assert packed.size == 0
    np.testing.assert_array_equal(unpack_indices(packed, 0, 1000), np.zeros(1000))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_accepts_torch_tensors_of_any_shape_and_int_dtype(dtype):
    indices = torch.randint(0, 100, (3, 5, 7), dtype=dtype)
    packed = pack_indices(indices, 7)
    assert packed.size == (105 * 7 + 7) // 8
    np.testing.assert_array_equal(
        unpack_indices(torch.from_numpy(packed), 7, 105), indices.reshape(-1).numpy()
    )


def test_narrow_output_dtype():
    indices = np.arange(256) % 200
    out = unpack_indices(pack_indices(indices, 8), 8, 256, dtype=np.uint8)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, indices)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_indices(pack_indices(indices, 9), 9, 256, dtype=np.uint8)


@pytest.mark.parametrize("bits", [0, 1, 4, 8, 13, 16])
def test_index_too_large_raises(bits):
    indices = np.zeros(50, dtype=np.int64)
    indices[37] = 1 << bits
    with pytest.raises(ValueError, match="position 37"):
        pack_indices(indices, bits)


def test_negative_index_raises():
    with pytest.raises(ValueError, match="does not fit"):
        pack_indices(np.array([0, -1, 2]), 4)


@pytest.mark.parametrize("bits", [-1, 17, 2.0, True])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_indices(np.zeros(3, dtype=np.int64), bits)


def test_float_indices_raise():
    with pytest.raises(TypeError, match="integers"):
        pack_indices(np.zeros(3), 2)


def test_wrong_byte_count_raises():
    packed = pack_indices(np.arange(10), 4)
    with pytest.raises(ValueError, match="take 5 bytes"):
        unpack_indices(packed[:-1], 4, 10)
    with pytest.raises(ValueError, match="take 5 bytes"):
        unpack_indices(np.concatenate([packed, packed[:1]]), 4, 10)
