"""Batches from in-memory uint8 image tensors (Fashion-MNIST fits in memory: 47 MB)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, H, W) or (N, C, H, W) images -> normalized float32 (N, C, H, W)."""
    x = images.to(torch.float32).div_(255.0)
    if x.dim() == 3:
        x = x.unsqueeze(1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


def random_flip_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Light augmentation for training: random horizontal flips and shifts of up to ``max_shift`` pixels."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


class TensorBatches:
    """Re-iterable batches of (images, labels) from normalized in-memory tensors.

    With ``shuffle`` the order changes every pass, driven by ``seed`` and the pass number (deterministic).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.passes = 0

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.passes)
        self.passes += 1
        n = self.images.shape[0]
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.images[idx]
            if self.augment:
                x = random_flip_shift(x, generator)
            yield x, self.labels[idx]
