"""Writing image data sets as WebDataset tar shards, with a manifest that makes a second run free."""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from hpcq.data.fashion_mnist import FASHION_MNIST_ROOT, load_fashion_mnist
from hpcq.data.images import BadImageError, list_images, prepare_image
from hpcq.errors import DataError
from hpcq.fileio import atomic_write_json

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hpcq-shards/1"
SHARD_PATTERN = "shard-%06d.tar"
MAX_BAD_EXAMPLES = 20
# A fixed tar member time makes two runs over the same input give byte-identical shards.
_TAR_MTIME = 0.0


@dataclass(frozen=True)
class Sample:
    """One sample to be written: ``load()`` returns the prepared uint8 image or raises BadImageError.

    Loading is deferred so that write_shards can count and skip a bad image instead of a generator
    dying halfway through a folder.
    """

    key: str
    source: str
    load: Callable[[], np.ndarray]
    label: int | None = None


@dataclass(frozen=True)
class ShardReport:
    """What a shard folder holds; the same fields as its manifest.json."""

    out_dir: Path
    description: dict[str, Any]
    written: int
    bad: int
    bad_examples: list[dict[str, str]] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    labelled: bool = False
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        """The manifest contents (paths relative to the folder, so the folder can be moved)."""
        return {
            "format": MANIFEST_FORMAT,
            "description": self.description,
            "written": self.written,
            "bad": self.bad,
            "bad_examples": self.bad_examples,
            "labelled": self.labelled,
            "shards": self.shards,
        }


def fashion_mnist_samples(
    split: str, indices: Iterable[int] | None = None, *, root: Path = FASHION_MNIST_ROOT
) -> Iterator[Sample]:
    """Yield labelled Fashion-MNIST samples (28x28 gray), keyed ``<split>-<index>``.

    Args:
        split: "train" or "test".
        indices: which images of the split, e.g. the train part of train_validation_indices; all if None.
        root: folder of the IDX files.
    """
    images, labels = load_fashion_mnist(split, root)
    array = images.numpy()
    chosen = range(len(array)) if indices is None else indices
    for index in chosen:
        index = int(index)
        if not 0 <= index < len(array):
            raise DataError(f"index {index} is outside Fashion-MNIST {split} (0..{len(array) - 1})")
        yield Sample(
            key=f"{split}-{index:05d}",
            source=f"fashion-mnist/{split}[{index}]",
            load=functools.partial(_row, array, index),
            label=int(labels[index]),
        )


def image_folder_samples(root: Path, image_size: int, channels: int) -> Iterator[Sample]:
    """Yield unlabelled samples for every image under ``root`` (see list_images), in sorted order.

    Keys come from the path relative to ``root`` with every character outside ``[A-Za-z0-9-]`` replaced
    by ``_``: WebDataset splits member names at the first dot, and a key like ``__x__`` would be read as
    metadata. A key that two paths share gets a ``-2``, ``-3``... suffix.
    """
    root = Path(root)
    used: set[str] = set()
    for path in list_images(root):
        key = _unique(sanitize_key(path.relative_to(root).with_suffix("").as_posix()), used)
        yield Sample(
            key=key, source=str(path), load=functools.partial(prepare_image, path, image_size, channels)
        )


def sanitize_key(name: str) -> str:
    """Make ``name`` a safe WebDataset key: no dots or slashes, not empty, no leading underscore."""
    key = re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_")
    return key or "sample"


def write_shards(
    samples: Iterable[Sample],
    out_dir: Path,
    shard_size: int,
    *,
    description: dict[str, Any],
    total: int | None = None,
) -> ShardReport:
    """Write samples as WebDataset shards ``shard-NNNNNN.tar`` plus ``manifest.json`` into ``out_dir``.

    Each sample becomes ``<key>.png`` (and ``<key>.cls`` when labelled). Everything is written into a
    temporary sibling folder that is renamed to ``out_dir`` at the end, so ``out_dir`` is either absent or
    complete. If ``out_dir`` already holds a manifest with the same description, nothing is written and
    the existing report is returned (``reused=True``).

    Args:
        samples: e.g. fashion_mnist_samples(...) or image_folder_samples(...).
        out_dir: the shard folder to create.
        shard_size: samples per shard (the last shard may hold fewer).
        description: what the shards are (source, image_size, channels...); JSON-serializable. shard_size
            is added to it.
        total: number of samples, for the progress bar only (taken from len(samples) when it has one).

    Raises:
        DataError: bad shard_size, out_dir in use by something else, or no sample could be written.
    """
    if shard_size < 1:
        raise DataError(f"shard_size must be at least 1 sample per shard, got {shard_size}")
    out_dir = Path(out_dir)
    if description.get("shard_size", shard_size) != shard_size:
        raise DataError(
            f"description says shard_size {description['shard_size']} but shard_size is {shard_size}; "
            "pass the same value (or leave it out of the description)."
        )
    # shard_size is part of the description so that asking for other shard sizes never reuses these.
    description = _normalized({**description, "shard_size": shard_size})
    existing = _existing_report(out_dir, description)
    if existing is not None:
        logger.info("reusing %d samples in %d shards at %s", existing.written, len(existing.shards), out_dir)
        return existing

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        written, bad, bad_examples, labelled = _write_all(samples, tmp_dir, shard_size, total)
        if written == 0:
            raise DataError(
                f"no sample could be written to {out_dir}: all {bad} were bad (first: "
                f"{bad_examples[0] if bad_examples else 'none'}). Check the source of the samples."
            )
        shards = sorted(p.name for p in tmp_dir.glob("shard-*.tar"))
        report = ShardReport(out_dir, description, written, bad, bad_examples, shards, labelled)
        atomic_write_json(tmp_dir / MANIFEST_NAME, report.to_json())
        return _publish(tmp_dir, out_dir, report)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def read_shard_manifest(out_dir: Path) -> ShardReport:
    """Read ``out_dir/manifest.json``.

    Raises:
        DataError: no manifest, or one that cannot be parsed.
    """
    out_dir = Path(out_dir)
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{out_dir} holds no {MANIFEST_NAME}; write the shards first with `hpcq shards`.")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise DataError(
                f"{path} has format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}; "
                "write the shards again with `hpcq shards` into a new folder."
            )
        return ShardReport(
            out_dir=out_dir,
            description=data["description"],
            written=int(data["written"]),
            bad=int(data["bad"]),
            bad_examples=list(data["bad_examples"]),
            shards=list(data["shards"]),
            labelled=bool(data["labelled"]),
            reused=True,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path} is damaged ({type(exc).__name__}: {exc}); delete {out_dir} and run `hpcq shards` again."
        ) from exc


def shard_urls(out_dir: Path) -> list[str]:
    """Return the paths of the shards listed in ``out_dir``'s manifest, as strings for WebDataset.

    Raises:
        DataError: no manifest, no shards, or a listed shard is missing.
    """
    report = read_shard_manifest(out_dir)
    paths = [Path(out_dir).resolve() / name for name in report.shards]
    if not paths:
        raise DataError(f"{out_dir}/{MANIFEST_NAME} lists no shards; write them again with `hpcq shards`.")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} shards listed in {out_dir}/{MANIFEST_NAME} are missing (e.g. {missing[0]}); "
            f"delete {out_dir} and write them again with `hpcq shards`."
        )
    return [str(p) for p in paths]


def _write_all(
    samples: Iterable[Sample], tmp_dir: Path, shard_size: int, total: int | None
) -> tuple[int, int, list[dict[str, str]], bool]:
    written = bad = 0
    bad_examples: list[dict[str, str]] = []
    labelled = False
    with wds.ShardWriter(
        str(tmp_dir / SHARD_PATTERN), maxcount=shard_size, verbose=0, mtime=_TAR_MTIME
    ) as sink:
        progress = tqdm(samples, total=total, desc="writing shards", unit="img", mininterval=1.0)
        for sample in progress:
            try:
                image = sample.load()
            except BadImageError as exc:
                bad += 1
                if len(bad_examples) < MAX_BAD_EXAMPLES:
                    bad_examples.append({"source": sample.source, "reason": str(exc)})
                logger.warning("skipping bad image %s: %s", sample.source, exc)
                continue
            record: dict[str, Any] = {"__key__": sample.key, "png": image}
            if sample.label is not None:
                record["cls"] = int(sample.label)
                labelled = True
            sink.write(record)
            written += 1
            progress.set_postfix(bad=bad, refresh=False)
    return written, bad, bad_examples, labelled


def _existing_report(out_dir: Path, description: dict[str, Any]) -> ShardReport | None:
    """The report of a finished earlier run with this description, None if out_dir is free."""
    if not out_dir.exists():
        return None
    if not (out_dir / MANIFEST_NAME).exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            return None  # an empty folder can be replaced by the rename
        raise DataError(
            f"{out_dir} exists but is not a shard folder (no {MANIFEST_NAME}); choose another folder or delete it."
        )
    report = read_shard_manifest(out_dir)
    if report.description != description:
        raise DataError(
            f"{out_dir} already holds shards of another description: {report.description} (asked for "
            f"{description}); choose another folder or delete it."
        )
    return report


def _publish(tmp_dir: Path, out_dir: Path, report: ShardReport) -> ShardReport:
    """Rename the finished temporary folder to out_dir; a concurrent run that finished first wins."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    try:
        tmp_dir.rename(out_dir)
    except OSError:
        existing = _existing_report(out_dir, report.description)
        if existing is None:
            raise
        logger.info("another run wrote %s first; using its shards", out_dir)
        return existing
    logger.info(
        "wrote %d samples in %d shards to %s (%d bad images skipped)",
        report.written,
        len(report.shards),
        out_dir,
        report.bad,
    )
    return report


def _normalized(description: dict[str, Any]) -> dict[str, Any]:
    """The description as it reads back from JSON (tuples become lists, Paths must be strings)."""
    try:
        return json.loads(json.dumps(description, sort_keys=True))
    except TypeError as exc:
        raise DataError(f"the shard description must be JSON-serializable: {exc}") from exc


def _row(images: np.ndarray, index: int) -> np.ndarray:
    return images[index]


def _unique(key: str, used: set[str]) -> str:
    candidate, n = key, 1
    while candidate in used:
        n += 1
        candidate = f"{key}-{n}"
    used.add(candidate)
    return candidate
