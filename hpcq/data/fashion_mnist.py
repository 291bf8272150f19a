"""Fashion-MNIST from its gzipped IDX files (as installed by the Debian package dataset-fashion-mnist)."""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from hpcq.errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where ``apt-get install dataset-fashion-mnist`` puts the four ``*-ubyte.gz`` files."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Class names, indexed by label."""

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGE_SIDE = 28


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one gzipped IDX file of unsigned bytes and return it as a uint8 array.

    Args:
        path: the ``.gz`` file.
        expected_magic: IDX_IMAGES_MAGIC (3-D) or IDX_LABELS_MAGIC (1-D); the magic number also fixes the
            number of dimensions (its low byte).

    Raises:
        DataError: the file is missing, not gzip, truncated, or not the IDX file that was expected.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist. Install Fashion-MNIST with `apt-get install dataset-fashion-mnist`, "
            "or pass the folder that holds the *-ubyte.gz files as root."
        )
    try:
        with gzip.open(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}); download or install it again.") from exc
    if len(raw) < 4:
        raise DataError(
            f"{path} is truncated: {len(raw)} bytes, shorter than the IDX header; install it again."
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path} has IDX magic number {magic}, expected {expected_magic}; "
            "it is not the file that was asked for (images and labels swapped, or another format)."
        )
    ndim = expected_magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DataError(
            f"{path} is truncated: {len(raw)} bytes, shorter than the IDX header; install it again."
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_bytes = header_size + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected_bytes:
        state = "truncated" if len(raw) < expected_bytes else "longer than its header says"
        raise DataError(
            f"{path} is {state}: {len(raw)} bytes, header {dims} needs {expected_bytes}; install it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_ROOT) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one Fashion-MNIST split.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Returns:
        uint8 images of shape (N, 28, 28) and int64 labels of shape (N,), in file order.

    Raises:
        DataError: unknown split, or missing, damaged or mismatched files.
    """
    if split not in _SPLIT_PREFIX:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; valid splits: {', '.join(_SPLIT_PREFIX)}")
    root = Path(root)
    prefix = _SPLIT_PREFIX[split]
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (_IMAGE_SIDE, _IMAGE_SIDE):
        raise DataError(f"{images_path} holds images of {images.shape[1:]} pixels, Fashion-MNIST has 28x28.")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "the two files do not belong together."
        )
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9.")
    logger.debug("loaded Fashion-MNIST %s: %d images from %s", split, len(images), root)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def train_validation_indices(n_train: int, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n_train)`` into disjoint, sorted train and validation index arrays.

    The same (n_train, validation_size, seed) always gives the same split, so the validation images kept
    out of teacher training are the ones the quantization sweep later measures on.

    Returns:
        (train_indices, validation_indices), int64, each sorted ascending.

    Raises:
        DataError: ``validation_size`` is not in [0, n_train).
    """
    if n_train < 1:
        raise DataError(f"n_train must be positive, got {n_train}")
    if not 0 <= validation_size < n_train:
        raise DataError(
            f"validation_size must be at least 0 and smaller than the {n_train} training images, "
            f"got {validation_size}"
        )
    permutation = np.random.default_rng(seed).permutation(n_train)
    validation = np.sort(permutation[:validation_size]).astype(np.int64)
    train = np.sort(permutation[validation_size:]).astype(np.int64)
    return train, validation
