"""The data a run uses, resolved from its config: labelled validation/test sets and unlabelled shards.

The unlabelled shards are split once: the last shard is held out for label-free evaluation (fidelity),
the others feed retraining, so fidelity is never measured on images the student trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch

from hpcq.config import NO_LABELS, RunConfig
from hpcq.data.shards import image_folder_samples, read_shard_manifest, shard_urls, write_shards
from hpcq.errors import ConfigError, DataError

log = logging.getLogger(__name__)

def has_labels(config: RunConfig) -> bool:
    """Whether the run has a labelled dataset (``data.labelled`` is not ``none``)."""
    return config.data.labelled != NO_LABELS


def _check_labelled(config: RunConfig) -> None:
    if not has_labels(config):
        raise ConfigError("this step needs labelled data, but data.labelled is none")


def validation_batches(config: RunConfig, limit_images: int | None = None) -> Iterable:
    """Labelled validation batches (held out of teacher training; for the sweep and the selection)."""
    from hpcq.teacher import fashion_splits

    _check_labelled(config)
    splits = fashion_splits(config.data, config.teacher, config.seed)
    return LimitedBatches(splits.validation, limit_images)


def test_batches(config: RunConfig) -> Iterable:
    """Labelled test batches: for the final report only, never for choices."""
    from hpcq.teacher import fashion_splits

    _check_labelled(config)
    return fashion_splits(config.data, config.teacher, config.seed).test


def labelled_train_batches(config: RunConfig, batch_size: int):
    """Labelled training batches (shuffled, augmented): only for the conventional retraining baseline."""
    from hpcq.teacher import fashion_splits

    _check_labelled(config)
    return fashion_splits(config.data, config.teacher, config.seed, train_batch_size=batch_size).train


class LimitedBatches:
    """Re-iterable view of the first ``limit_images`` images of a batch iterable (all when None)."""

    def __init__(self, batches: Iterable, limit_images: int | None) -> None:
        self.batches, self.limit_images = batches, limit_images

    def __iter__(self) -> Iterator:
        left = self.limit_images
        for batch in self.batches:
            if left is not None and left <= 0:
                return
            images = batch[0] if isinstance(batch, list | tuple) else batch
            if left is not None and images.shape[0] > left:
                batch = tuple(t[:left] for t in batch) if isinstance(batch, list | tuple) else batch[:left]
                images = images[:left]
            if left is not None:
                left -= images.shape[0]
            yield batch


def unlabelled_shard_dir(config: RunConfig) -> Path:
    """Where the unlabelled shards live: ``data.shard_dir`` or a cache folder named after their settings."""
    if config.data.shard_dir:
        return Path(config.data.shard_dir)
    name = Path(config.data.unlabelled).name or "images"
    cache = Path(config.teacher.cache_dir).expanduser()
    return cache / "shards" / f"{name}-{config.data.image_size}px-{config.data.channels}ch-{config.data.shard_size}"


def ensure_unlabelled_shards(config: RunConfig) -> list[str]:
    """Write the unlabelled image folder as WebDataset shards (once) and return all their paths."""
    out_dir = unlabelled_shard_dir(config)
    d = config.data
    description = {"source": str(Path(d.unlabelled).resolve()), "image_size": d.image_size,
                   "channels": d.channels, "shard_size": d.shard_size}
    if (out_dir / "manifest.json").is_file():
        report = read_shard_manifest(out_dir)
    else:
        report = write_shards(image_folder_samples(Path(d.unlabelled), d.image_size, d.channels), out_dir,
                              d.shard_size, description=description)
    if report.bad:
        log.warning("%d unreadable images were skipped while writing %s (see its manifest.json)", report.bad, out_dir)
    return shard_urls(out_dir)


def split_unlabelled(urls: list[str]) -> tuple[list[str], list[str]]:
    """(training shards, held-out evaluation shards): the last shard is held out."""
    if len(urls) < 2:
        raise DataError(
            f"the unlabelled data has {len(urls)} shard(s); at least 2 are needed (one is held out for "
            "label-free evaluation). Write smaller shards: --set data.shard_size=N"
        )
    return urls[:-1], urls[-1:]


def unlabelled_eval_batches(config: RunConfig, urls: list[str], limit_images: int | None = None) -> Iterable:
    """Held-out unlabelled batches for label-free fidelity (in order, no augmentation)."""
    from hpcq.data.loaders import finite_unlabelled_batches

    _, held_out = split_unlabelled(urls)
    batches = finite_unlabelled_batches(held_out, batch_size=config.data.eval_batch_size, mean=config.data.mean,
                                        std=config.data.std)
    return LimitedBatches(batches, limit_images)


def first_images(batches: Iterable, count: int) -> torch.Tensor:
    """The first ``count`` images of a batch iterable, as one tensor (for example inputs)."""
    images = [b[0] if isinstance(b, list | tuple) else b for b in islice(batches, count)]
    return torch.cat(images)[:count]
