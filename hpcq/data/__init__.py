"""Data: Fashion-MNIST, image folders, WebDataset shards and the streaming unlabelled loader."""

from hpcq.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    load_fashion_mnist,
    read_idx,
    train_validation_indices,
)
from hpcq.data.images import IMAGE_SUFFIXES, OPENCLIPART_ROOT, BadImageError, list_images, prepare_image
from hpcq.data.loaders import UnlabelledLoader, finite_unlabelled_batches, unlabelled_loader
from hpcq.data.shards import (
    Sample,
    ShardReport,
    fashion_mnist_samples,
    image_folder_samples,
    read_shard_manifest,
    shard_urls,
    write_shards,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMAGE_SUFFIXES",
    "OPENCLIPART_ROOT",
    "BadImageError",
    "Sample",
    "ShardReport",
    "UnlabelledLoader",
    "fashion_mnist_samples",
    "finite_unlabelled_batches",
    "image_folder_samples",
    "list_images",
    "load_fashion_mnist",
    "prepare_image",
    "read_idx",
    "read_shard_manifest",
    "shard_urls",
    "train_validation_indices",
    "unlabelled_loader",
    "write_shards",
]
