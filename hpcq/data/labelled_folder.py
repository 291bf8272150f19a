"""Labelled image folders: one subfolder per class (ImageNet's layout), for top-1/top-5 evaluation.

Classes are the subfolder names in sorted order, numbered from 0 (torchvision's ``ImageFolder``
convention; for ImageNet's synset folders this is the class order torchvision's weights use). Every image
goes through the usual evaluation transform: the shorter side resized to ``resize`` pixels (bilinear),
then the central ``image_size`` x ``image_size`` crop, gray or RGB, normalized per batch. Decoding runs in
DataLoader workers; an image that cannot be decoded is skipped, counted and reported, never fatal.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from hpcq.data.images import BadImageError, decode_image, list_images
from hpcq.data.memory import normalize
from hpcq.errors import DataError
from hpcq.fileio import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledFolder:
    """The classes (sorted subfolder names) and every (image path, class index) of a labelled folder."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]

    def subset(self, limit_images: int | None, seed: int) -> LabelledFolder:
        """At most ``limit_images`` samples drawn without replacement under ``seed`` (so a subset of a
        class-sorted folder still covers the classes); all of them, in order, when the limit is None or
        not below the size."""
        if limit_images is None or limit_images >= len(self.samples):
            return self
        order = np.random.default_rng(seed).permutation(len(self.samples))[:limit_images]
        return LabelledFolder(self.root, self.classes, tuple(self.samples[i] for i in sorted(order)))


def read_labelled_folder(root: Path | str, expected_classes: int | None = None,
                         listing: Path | None = None) -> LabelledFolder:
    """List a labelled folder (``root/CLASS/.../image``).

    ``listing``: a JSON file that keeps the listing, written the first time and read after that (when it
    is of the same folder), so that the many tasks of a sweep do not each walk an ImageNet-sized tree on a
    shared filesystem.

    Raises:
        DataError: ``root`` is missing or not a folder, has no class subfolders, a class subfolder holds no
            image, or the number of classes differs from ``expected_classes`` (the model's outputs).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"labelled image folder {root} does not exist or is not a folder; point data.labelled_validation "
            "and data.labelled_test at folders with one subfolder per class (e.g. ImageNet's val/n01440764/...)"
        )
    folder = _read_listing(root, listing) if listing is not None else None
    if folder is None:
        folder = _walk(root)
        if listing is not None:
            atomic_write_json(listing, {"root": str(root.resolve()), "classes": list(folder.classes),
                                        "samples": [[str(path.relative_to(root)), label]
                                                    for path, label in folder.samples]})
    if expected_classes is not None and len(folder.classes) != expected_classes:
        raise DataError(
            f"labelled image folder {root} has {len(folder.classes)} class subfolders but the model has "
            f"{expected_classes} outputs; the folder must hold one subfolder per output class"
        )
    return folder


def _walk(root: Path) -> LabelledFolder:
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"labelled image folder {root} has no class subfolders: put each class's images in "
                        "a subfolder named after the class")
    samples: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        samples.extend((path, index) for path in list_images(root / name))
    return LabelledFolder(root, classes, tuple(samples))


def _read_listing(root: Path, listing: Path) -> LabelledFolder | None:
    try:
        saved = json.loads(listing.read_text())
    except (OSError, ValueError):
        return None  # not written yet, or damaged: list again
    if saved.get("root") != str(root.resolve()):
        return None
    return LabelledFolder(root, tuple(saved["classes"]),
                          tuple((root / relative, int(label)) for relative, label in saved["samples"]))


def evaluation_image(path: Path, image_size: int, resize: int, channels: int) -> np.ndarray:
    """The evaluation transform of one image: (H, W) gray or (H, W, 3) RGB uint8 (see the module doc).

    Raises:
        BadImageError: the file cannot be read or decoded.
    """
    try:
        image = decode_image(path, resize, fit="short")
    except Exception as exc:  # PIL raises many types for broken files; all mean "unusable"
        raise BadImageError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from exc
    image = image.convert("L" if channels == 1 else "RGB")
    width, height = image.size
    # As torchvision's Resize(resize) and CenterCrop(image_size): the long side truncated, the crop's
    # corner rounded.
    if width <= height:
        size = (resize, int(resize * height / width))
    else:
        size = (int(resize * width / height), resize)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = round((size[0] - image_size) / 2), round((size[1] - image_size) / 2)
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8).copy()


class _FolderImages(Dataset):
    """(uint8 (C, H, W) image, label) per sample; None for an image that cannot be decoded."""

    def __init__(self, samples: Sequence[tuple[Path, int]], image_size: int, resize: int, channels: int) -> None:
        self.samples, self.image_size, self.resize, self.channels = samples, image_size, resize, channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            pixels = torch.from_numpy(evaluation_image(path, self.image_size, self.resize, self.channels))
        except BadImageError as exc:
            log.warning("skipped: %s", exc)
            return None
        return (pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)), label


def _stack_good(items: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, torch.Tensor, int]:
    good = [item for item in items if item is not None]
    bad = len(items) - len(good)
    if not good:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([image for image, _ in good]), torch.tensor([label for _, label in good]), bad


class LabelledFolderBatches:
    """Re-iterable (images, labels) batches of a labelled folder: float32 normalized images, int64 labels.

    ``bad_images`` holds how many images the last complete pass skipped.
    """

    def __init__(self, folder: LabelledFolder, *, image_size: int, resize: int, channels: int,
                 mean: Sequence[float], std: Sequence[float], batch_size: int, workers: int) -> None:
        self.folder = folder
        self.dataset = _FolderImages(folder.samples, image_size, resize or image_size, channels)
        self.mean, self.std = tuple(mean), tuple(std)
        self.batch_size, self.workers = batch_size, workers
        self.bad_images = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            collate_fn=_stack_good)
        bad = 0
        for images, labels, skipped in loader:
            bad += skipped
            if labels.numel():
                yield normalize(images, self.mean, self.std), labels
        self.bad_images = bad
        if bad:
            log.warning("%d of %d images under %s could not be decoded and were skipped", bad,
                        len(self.dataset), self.folder.root)
