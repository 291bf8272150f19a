"""The data a run uses, resolved from its config: labelled validation/test sets and unlabelled shards.

The unlabelled shards are split once: the last shard is held out for the report's label-free evaluation
(fidelity), the second-to-last for label-free choices (sweep, selection), the others feed retraining.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Literal

import torch

from hpcq.config import NO_LABELS, RunConfig
from hpcq.data.shards import image_folder_samples, shard_urls, write_shards
from hpcq.errors import ConfigError, DataError

log = logging.getLogger(__name__)

def has_labels(config: RunConfig) -> bool:
    """Whether the run has a labelled dataset (``data.labelled`` is not ``none``)."""
    return config.data.labelled != NO_LABELS


def _check_labelled(config: RunConfig) -> None:
    if not has_labels(config):
        raise ConfigError("this step needs labelled data, but data.labelled is none")


def validation_batches(config: RunConfig, limit_images: int | None = None) -> Iterable:
    """Labelled validation batches (held out of teacher training; for the sweep and the selection).

    From an image folder, ``limit_images`` are drawn at random under the run's seed (the same ones every
    time), so that a class-sorted folder is covered across its classes."""
    from hpcq.teacher import fashion_splits

    _check_labelled(config)
    if config.data.labelled == "imagefolder":
        return labelled_folder_batches(config, config.data.labelled_validation, limit_images)
    splits = fashion_splits(config.data, config.teacher, config.seed)
    return LimitedBatches(splits.validation, limit_images)


def test_batches(config: RunConfig) -> Iterable:
    """Labelled test batches: for the final report only, never for choices."""
    from hpcq.teacher import fashion_splits

    _check_labelled(config)
    if config.data.labelled == "imagefolder":
        return labelled_folder_batches(config, config.data.labelled_test)
    return fashion_splits(config.data, config.teacher, config.seed).test


def labelled_folder_batches(config: RunConfig, root: str, limit_images: int | None = None,
                            num_classes: int | None = None) -> Iterable:
    """Evaluation batches of a labelled image folder (one subfolder per class) with the run's transform."""
    from hpcq.data.labelled_folder import LabelledFolderBatches, read_labelled_folder

    d = config.data
    # Inside a run directory the listing is taken once (prepare) and read by every later stage and task.
    run_dir = Path(config.run_dir)
    digest = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:12]
    listing = run_dir / "labelled" / f"{digest}.json" if run_dir.is_dir() else None
    folder = read_labelled_folder(root, num_classes, listing).subset(limit_images, config.seed)
    return LabelledFolderBatches(folder, image_size=d.image_size, resize=d.labelled_resize, channels=d.channels,
                                 mean=d.mean, std=d.std, batch_size=d.eval_batch_size, workers=d.eval_workers)


def check_labelled_folders(config: RunConfig, num_classes: int) -> None:
    """With ``data.labelled: imagefolder``, check now that both folders exist and have one subfolder per
    model output (DataError otherwise), before any long stage reads them."""
    if config.data.labelled == "imagefolder":
        for root in (config.data.labelled_validation, config.data.labelled_test):
            labelled_folder_batches(config, root, num_classes=num_classes)


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
    source = Path(config.data.unlabelled).expanduser().resolve()
    # The folder name carries the settings and a digest of the source path, so two sources never share it.
    digest = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    d = config.data
    cache = Path(config.teacher.cache_dir).expanduser()
    return cache / "shards" / f"{source.name or 'images'}-{digest}-{d.image_size}px-{d.channels}ch-{d.shard_size}"


def ensure_unlabelled_shards(config: RunConfig) -> list[str]:
    """Write the unlabelled image folder as WebDataset shards (once) and return all their paths."""
    out_dir = unlabelled_shard_dir(config)
    d = config.data
    description = {"source": str(Path(d.unlabelled).resolve()), "image_size": d.image_size,
                   "channels": d.channels, "shard_size": d.shard_size}
    # write_shards reuses a folder written with the same description and refuses one written from another.
    report = write_shards(image_folder_samples(Path(d.unlabelled), d.image_size, d.channels), out_dir,
                          d.shard_size, description=description)
    if report.bad:
        log.warning("%d unreadable images were skipped while writing %s (see its manifest.json)", report.bad, out_dir)
    return shard_urls(out_dir)


@dataclass(frozen=True)
class UnlabelledSplit:
    """The unlabelled shards by use: retraining, label-free choices (sweep, selection), the final report.

    Two shards are held out so that the fidelity a run reports is not measured on the images that chose
    its plan, nor on those it retrained on.
    """

    train: list[str]
    select: list[str]
    report: list[str]


def split_unlabelled(urls: list[str]) -> UnlabelledSplit:
    """Split the shards: the second-to-last for choices, the last for the report, the rest for retraining."""
    if len(urls) < 3:
        raise DataError(
            f"the unlabelled data has {len(urls)} shard(s); at least 3 are needed (two are held out for "
            "label-free evaluation). Write smaller shards: --set data.shard_size=N"
        )
    return UnlabelledSplit(train=urls[:-2], select=urls[-2:-1], report=urls[-1:])


def unlabelled_eval_batches(config: RunConfig, urls: list[str], limit_images: int | None = None, *,
                            purpose: Literal["select", "report"] = "select") -> Iterable:
    """Held-out unlabelled batches for label-free fidelity (in order, no augmentation).

    ``purpose`` picks the held-out shard: ``select`` for the sweep and the selection, ``report`` for the
    final report. At most one shard's images are used (``data.shard_size``), even if ``limit_images`` is larger.
    """
    from hpcq.data.loaders import finite_unlabelled_batches

    held_out = getattr(split_unlabelled(urls), purpose)
    batches = finite_unlabelled_batches(held_out, batch_size=config.data.eval_batch_size, mean=config.data.mean,
                                        std=config.data.std)
    return LimitedBatches(batches, limit_images)


def first_images(batches: Iterable, count: int) -> torch.Tensor:
    """The first ``count`` images of a batch iterable, as one tensor (for example inputs)."""
    images = [b[0] if isinstance(b, list | tuple) else b for b in islice(batches, count)]
    return torch.cat(images)[:count]
