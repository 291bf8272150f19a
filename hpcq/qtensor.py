"""A quantized tensor: a codebook of k float centroids and one index per element."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def bits_for(k: int) -> int:
    """Bits per index for a codebook of k centroids: ceil(log2 k), 0 when k == 1."""
    if k < 1:
        raise ValueError(f"a codebook needs at least 1 centroid, got k={k}")
    return 0 if k == 1 else math.ceil(math.log2(k))


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized parameter.

    ``codebook`` is a float32 tensor of shape (k,), sorted ascending; ``indices`` is an integer tensor with
    the parameter's shape whose values lie in [0, k). ``dequantize()`` gives the values the model uses.
    """

    codebook: torch.Tensor
    indices: torch.Tensor

    @property
    def k(self) -> int:
        """Number of centroids."""
        return int(self.codebook.numel())

    @property
    def bits(self) -> int:
        """Bits per index when bit-packed."""
        return bits_for(self.k)

    @property
    def shape(self) -> torch.Size:
        """Shape of the parameter this tensor stands for."""
        return self.indices.shape

    def dequantize(self) -> torch.Tensor:
        """The parameter's values: ``codebook[indices]`` (float32, the parameter's shape)."""
        return self.codebook[self.indices.long()]
