"""The streaming unlabelled image pipeline for retraining under DistributedDataParallel.

The pipeline is an explicit list of module-level (so picklable) WebDataset stages:

    shard list -> split by rank -> split by worker -> repeat endlessly -> tar to samples -> count
    -> shuffle -> decode PNG to a uint8 tensor -> batch -> (augment)

run by the DataLoader workers, followed in the training process by one vectorised step per batch:

    -> to float32, / 255, normalize

The images stay uint8 until that last step: the workers do no per-image float work and hand over a
quarter of the bytes, which matters where they share a few cores with the training threads.

Every rank reads a disjoint subset of the shards (split by the rank and world size passed in, never by
environment variables), repeats it endlessly, and each epoch is cut at exactly ``batches_per_epoch``
batches: DDP hangs in its all-reduce when one rank runs out of batches before the others.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import count, islice
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from hpcq.errors import DataError

logger = logging.getLogger(__name__)

# Warn about the first few bad samples of a worker, then only every BAD_WARN_EVERY-th, so that a damaged
# shard cannot flood the job log.
BAD_WARN_FIRST = 10
BAD_WARN_EVERY = 1000
# A worker that has seen this many bad samples and not one good one is reading garbage; stop it rather
# than spin forever on an endless stream.
MAX_BAD_WITHOUT_GOOD = 1000
# Batches each DataLoader worker keeps ready (torch's default is 2); uint8 batches are small.
PREFETCH_BATCHES = 4


class StreamHealth:
    """Counts of one worker's stream, shared by its stages (they are pickled into the worker together)."""

    def __init__(self, max_bad_without_good: int = MAX_BAD_WITHOUT_GOOD) -> None:
        self.max_bad_without_good = max_bad_without_good
        self.samples = 0  # raw samples read from tar files
        self.good = 0  # samples that became tensors
        self.bad = 0

    def handle(self, exn: Exception) -> bool:
        """WebDataset exception handler: count and warn, and go on with the next sample."""
        self.bad += 1
        if self.bad <= BAD_WARN_FIRST or self.bad % BAD_WARN_EVERY == 0:
            logger.warning("skipping bad sample (%d bad so far in this worker): %s", self.bad, exn)
        if self.good == 0 and self.bad >= self.max_bad_without_good:
            raise DataError(
                f"{self.bad} bad samples and no good one: the shards are not PNG image shards written by "
                f"`hpcq shards` (last error: {exn}). Write them again with `hpcq shards`."
            )
        return True


class ShardList(wds.PipelineStage):
    """The source stage: the shard urls, once (RepeatShards repeats them after the split)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    def run(self) -> Iterator[str]:
        return iter(self.urls)


def _split_by_rank(src: Iterable[str], rank: int, world_size: int) -> Iterator[str]:
    yield from islice(src, rank, None, world_size)


def _split_by_worker(src: Iterable[str]) -> Iterator[str]:
    info = get_worker_info()
    if info is None:
        yield from src
    else:
        yield from islice(src, info.id, None, info.num_workers)


def _worker_id() -> int:
    info = get_worker_info()
    return 0 if info is None else info.id


def _stream_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from (seed, epoch, rank, worker, stage)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class RepeatShards(wds.PipelineStage):
    """Yield ``{"url": ...}`` for this worker's shards endlessly, in a new seeded order on each pass."""

    def __init__(self, seed: int, epoch: int, rank: int, health: StreamHealth) -> None:
        self.seed, self.epoch, self.rank, self.health = seed, epoch, rank, health

    def run(self, src: Iterable[str]) -> Iterator[dict[str, str]]:
        urls = list(src)
        if not urls:
            raise DataError(f"rank {self.rank} worker {_worker_id()} got no shard; use fewer workers.")
        rng = np.random.default_rng(_stream_seed(self.seed, self.epoch, self.rank, _worker_id(), 1))
        for pass_number in count():
            before = self.health.samples
            for index in rng.permutation(len(urls)):
                yield {"url": urls[index]}
            # The counting stage has seen every sample of the pass by the time the next url is asked for.
            if self.health.samples == before:
                raise DataError(
                    f"pass {pass_number} over the {len(urls)} shards of rank {self.rank} worker {_worker_id()} "
                    f"gave no sample (e.g. {urls[0]}): the shards are empty or unreadable (see the warnings "
                    "above). Write them again with `hpcq shards`."
                )


def _tar_to_samples(src: Iterable[dict[str, str]], health: StreamHealth) -> Iterator[dict[str, Any]]:
    """Like wds.tarfile_to_samples: the members of each shard grouped into samples ``{"__key__": key,
    "__url__": url, suffix: bytes, ...}``, consecutive members with the same key (the name up to the first
    dot of its base name) making one sample, suffixes in lower case, ``__meta__`` names skipped. But it
    reads the tar headers itself (the standard library's tarfile costs about five times as much per member,
    which made it the largest part of a worker's time with small images), and closes each shard file as
    soon as it is read (and when the epoch is cut mid-shard) instead of leaving it to the garbage collector.
    A damaged shard is reported to ``health`` and the samples read before the damage are kept."""
    for source in _open_shards(src, health):
        url = source["url"]
        sample: dict[str, Any] | None = None
        try:
            for name, data in _tar_members(source["stream"]):
                slash = name.rfind("/")
                dot = name.find(".", slash + 1)
                if dot <= slash + 1 or (name.startswith("__") and _TAR_META.match(name)):
                    continue  # no key (as WebDataset: a base name without a dot, or starting with one)
                key, suffix = name[:dot], name[dot + 1 :].lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                elif suffix in sample:
                    health.handle(ValueError(f"{url}: member {name} of sample {key!r} appears twice; kept the first"))
                    continue
                sample[suffix] = data
        except (OSError, ValueError) as exn:
            health.handle(ValueError(f"{url}: {exn}"))
        if sample is not None:
            yield sample


_TAR_META = re.compile(r"__[^/]*__($|/)")
_TAR_BLOCK = 512
_TAR_POSIX_MAGIC = b"ustar\x0000"
# Member types with no data blocks after the header whatever their size field says (tarfile's rule):
# hard and symbolic links, character and block devices, directories, fifos.
_TAR_NO_DATA = frozenset(b"123456")


def _tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of an uncompressed tar stream, in order: ustar, POSIX pax
    (``path`` and ``size`` records) and GNU long names; links, directories and other members skipped.

    Raises:
        ValueError: not a tar stream (bad header checksum), or cut short.
    """
    offset = 0
    pax: dict[bytes, bytes] = {}
    long_name: str | None = None
    while True:
        header = _read_exactly(stream, _TAR_BLOCK, offset)
        if not header:
            if offset == 0:
                raise ValueError("empty file, not a tar archive")
            return  # no end-of-archive blocks: tolerated, as tarfile does
        if header.count(0) == _TAR_BLOCK:
            return  # end of archive
        _check_tar_header(header, offset)
        kind = header[156:157]
        size = int(pax[b"size"]) if b"size" in pax else _tar_number(header[124:136], offset)
        offset += _TAR_BLOCK
        data = b""
        if kind not in _TAR_NO_DATA:
            padding = -size % _TAR_BLOCK  # data is padded to whole blocks
            data = _read_exactly(stream, size, offset, exact=True)
            _read_exactly(stream, padding, offset + size, exact=True)
            offset += size + padding
        if kind == b"x":  # pax extended header of the next member
            pax = _pax_records(data, offset)
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind in (b"g", b"K"):  # pax global header, GNU long link name: nothing we use
            continue
        if b"path" in pax:
            name = pax[b"path"].decode("utf-8", "surrogateescape")
        elif long_name is not None:
            name = long_name
        else:
            name = _tar_string(header[0:100])
            if header[257:265] == _TAR_POSIX_MAGIC and header[345] != 0:
                name = _tar_string(header[345:500]) + "/" + name
        pax, long_name = {}, None
        if kind in (b"0", b"\0", b"7") and not name.endswith("/"):
            yield name, data


def _read_exactly(stream: Any, size: int, offset: int, exact: bool = False) -> bytes:
    """``size`` bytes from ``stream``; fewer only at the end of the stream, and then an error if ``exact``
    or if the stream ends inside a header block."""
    data = stream.read(size) if size else b""
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    if len(data) < size and (exact or data):
        raise ValueError(f"the file is cut short: ends at byte {offset + len(data)} inside a tar member")
    return data


def _check_tar_header(header: bytes, offset: int) -> None:
    stored = _tar_number(header[148:156], offset)
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as 8 spaces
    if stored == unsigned:
        return
    # Some old tar programs summed signed bytes: each byte over 127 then counts 256 less.
    if stored != unsigned - 256 * sum(1 for byte in header[:148] + header[156:] if byte > 127):
        gzip = " (it is gzip-compressed: the loaders read uncompressed tar files)" if header[:2] == b"\x1f\x8b" else ""
        raise ValueError(f"not a tar archive, or damaged: bad header checksum at byte {offset}{gzip}")


def _tar_number(field: bytes, offset: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 (only the positive form is meaningful here)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"not a tar archive, or damaged: bad number {field!r} in the header at byte {offset}") from None


def _tar_string(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes, offset: int) -> dict[bytes, bytes]:
    """The ``length key=value\\n`` records of a pax extended header."""
    records: dict[bytes, bytes] = {}
    position = 0
    while position < len(data) and data[position] != 0:
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise ValueError(f"bad pax extended header before byte {offset}") from None
        if space < 0 or length <= 0 or position + length > len(data):
            raise ValueError(f"bad pax extended header before byte {offset}")
        key, equals, value = data[space + 1 : position + length - 1].partition(b"=")
        if equals:
            records[key] = value
        position += length
    return records


def _open_shards(src: Iterable[dict[str, str]], health: StreamHealth) -> Iterator[dict[str, Any]]:
    for source in src:
        try:
            stream = wds.gopen(source["url"], "rb")
        except Exception as exn:
            exn.args = (*exn.args, source["url"])
            health.handle(exn)
            continue
        try:
            yield {**source, "stream": stream}
        finally:
            stream.close()


def _count_samples(src: Iterable[dict[str, Any]], health: StreamHealth) -> Iterator[dict[str, Any]]:
    for sample in src:
        health.samples += 1
        yield sample


class SeededShuffle(wds.PipelineStage):
    """Shuffle samples through a buffer, with a seed that differs per epoch, rank and worker."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def run(self, src: Iterable[Any]) -> Iterator[Any]:
        if self.bufsize <= 1:
            return iter(src)
        seed = _stream_seed(self.seed, self.epoch, self.rank, _worker_id(), 2)
        return wds.shuffle(self.bufsize, initial=self.bufsize, seed=seed)(iter(src))


def _decode_images(src: Iterable[dict[str, Any]], health: StreamHealth) -> Iterator[torch.Tensor]:
    """Samples -> (C, H, W) uint8 image tensors; a sample that cannot be decoded is reported to ``health``."""
    for sample in src:
        try:
            image = _decode_png(sample)
        except ValueError as exn:
            health.handle(exn)
            continue
        health.good += 1
        yield image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_torchvision_decode_png: Any = None


def _png_decoder() -> Any:
    """torchvision.io.decode_png, imported on first use (importing torchvision takes a second or so).
    UnlabelledLoader imports it before starting its workers, so that forked workers inherit it."""
    global _torchvision_decode_png
    if _torchvision_decode_png is None:
        from torchvision.io import decode_png

        _torchvision_decode_png = decode_png
    return _torchvision_decode_png


def _decode_png(sample: dict[str, Any]) -> torch.Tensor:
    """The sample's .png member as a (C, H, W) uint8 tensor, gray (C = 1) or RGB (C = 3).

    8-bit gray and RGB PNGs (what `hpcq shards` writes) are decoded by torchvision (libpng), about twice
    as fast as PIL for small images, and pixel for pixel the same; any other PNG, and any that torchvision
    refuses, by PIL, converted to RGB when neither gray nor RGB.

    Raises:
        ValueError: no .png member, or not a decodable PNG.
    """
    data = sample.get("png")
    if data is None:
        raise ValueError(
            f"{_where(sample)} has no .png member (members: {sorted(k for k in sample if k[0] != '_')})"
        )
    # IHDR, the first chunk, at a fixed place: bit depth at byte 24, colour type at 25 (0 gray, 2 RGB).
    if len(data) > 25 and data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24] == 8:
        channels = {0: 1, 2: 3}.get(data[25])
        if channels is not None:
            try:
                image = _png_decoder()(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            except RuntimeError:
                pass  # damaged: PIL decides, and says why
            else:
                if image.dtype == torch.uint8 and image.shape[0] == channels:
                    return image
    try:
        with Image.open(io.BytesIO(data)) as pil_image:
            pil_image.load()
            if pil_image.mode not in ("L", "RGB"):
                pil_image = pil_image.convert("RGB")
            array = np.array(pil_image, dtype=np.uint8)
    except Exception as exc:
        # PIL raises many exception types for broken data; each means "this sample is bad".
        raise ValueError(f"{_where(sample)}: cannot decode PNG: {type(exc).__name__}: {exc}") from exc
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _where(sample: dict[str, Any]) -> str:
    return f"sample {sample.get('__key__')!r} of {sample.get('__url__')}"


class RandomFlipShift(wds.PipelineStage):
    """Light augmentation of (B, C, H, W) batches, each image on its own: horizontal flip with probability
    1/2, and a random shift of up to ~10% of the side (uniform in -pad..pad on each axis), padded with 0,
    i.e. black (the background of the prepared images). Works on any dtype; here uint8."""

    def __init__(self, seed: int, epoch: int, rank: int) -> None:
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def run(self, src: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(
            _stream_seed(self.seed, self.epoch, self.rank, _worker_id(), 3)
        )
        for batch in src:
            yield flip_shift(batch, generator)


def flip_shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``batch`` (B, C, H, W) with image b flipped left-right when a coin says so and then shifted: padded
    by ``pad`` zeros on every side and cropped back to (H, W) at a random offset (0..2 pad per axis).

    One gather for the whole batch instead of a pad and a crop per image."""
    size, channels, height, width = batch.shape
    pad = max(1, round(0.1 * min(height, width)))
    flip = torch.rand(size, generator=generator) < 0.5
    top, left = torch.randint(0, 2 * pad + 1, (2, size), generator=generator)
    padded = F.pad(batch, (pad, pad, pad, pad))
    padded_width = width + 2 * pad
    rows = top[:, None] + torch.arange(height)  # (B, H): rows of the padded image to read
    cols = left[:, None] + torch.arange(width)  # (B, W)
    # Flipping before padding is flipping after it (the padding is symmetric): read column Wp-1-c.
    cols = torch.where(flip[:, None], padded_width - 1 - cols, cols)
    index = (rows[:, :, None] * padded_width + cols[:, None, :]).view(size, 1, height * width)
    out = padded.view(size, channels, -1).gather(2, index.expand(size, channels, height * width))
    return out.view(size, channels, height, width)


class Normalize:
    """uint8 images (C, H, W) or batches (B, C, H, W) -> float32 ``(x / 255 - mean) / std`` per channel; a
    single value applies to every channel. The same operations, in the same order, as converting each image
    to float, dividing by 255 and normalizing it, so the result is bit for bit the same."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.mean = _per_channel("mean", mean)
        self.std = _per_channel("std", std)
        if (self.std <= 0).any():
            raise DataError(f"std must be positive, got {std}")

    def __call__(self, images: torch.Tensor, *, pin_memory: bool = False) -> torch.Tensor:
        """``pin_memory``: put the result in page-locked memory (for fast copies to a CUDA device)."""
        channels = images.shape[-3]
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) not in (1, channels):
                raise DataError(
                    f"{name} has {len(values)} values but the images have {channels} channels; give one value "
                    f"or {channels}."
                )
        out = torch.empty(images.shape, dtype=torch.float32, pin_memory=pin_memory)
        out.copy_(images).div_(255.0)
        return out.sub_(self.mean.view(-1, 1, 1)).div_(self.std.view(-1, 1, 1))


def _per_channel(name: str, value: float | Sequence[float]) -> torch.Tensor:
    values = [value] if isinstance(value, (int, float)) else list(value)
    if not values:
        raise DataError(f"{name} must be a number or a list of one number per channel, got {value!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DataError(
            f"images of different shapes {sorted(shapes)} in one batch: the shards mix image sizes or channels; "
            "use shards written with one image_size and channels."
        )
    return torch.stack(images)


class UnlabelledLoader:
    """Iterable over normalized float32 batches (B, C, H, W); every iteration is one epoch of exactly
    ``batches_per_epoch`` batches. Epochs are numbered from 0 and advance on each iteration; call
    set_epoch() to choose one (e.g. when resuming), which also fixes its shuffling.

    The workers run ``pipeline(epoch)`` (uint8 batches); ``normalize`` turns each batch into floats here,
    in page-locked memory when CUDA is available."""

    def __init__(
        self,
        urls: list[str],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        batches_per_epoch: int,
        shuffle_buffer: int,
        seed: int,
        augment: bool,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        multiprocessing_context: str | None = None,
    ) -> None:
        _check_counts(batch_size=batch_size, batches_per_epoch=batches_per_epoch, world_size=world_size)
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..{world_size - 1} for world_size {world_size}, got {rank}")
        if num_workers < 0:
            raise DataError(f"num_workers must be 0 or more, got {num_workers}")
        if shuffle_buffer < 0:
            raise DataError(f"shuffle_buffer must be 0 (no shuffling) or more, got {shuffle_buffer}")
        methods = multiprocessing.get_all_start_methods()
        if multiprocessing_context is not None and multiprocessing_context not in methods:
            raise DataError(
                f"multiprocessing_context must be one of {', '.join(methods)} (or None: torch's default), got "
                f"{multiprocessing_context!r}"
            )
        needed = world_size * max(1, num_workers)
        if len(urls) < needed:
            raise DataError(
                f"{len(urls)} shards for {world_size} ranks x {max(1, num_workers)} data loader workers: every "
                f"worker of every rank needs its own shard, so at least {needed} are needed. Write more, smaller "
                "shards with `hpcq shards --shard-size N`, or use fewer workers."
            )
        self.urls = list(urls)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.batches_per_epoch = batches_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.augment = augment
        self.normalize = Normalize(mean, std)
        self.multiprocessing_context = multiprocessing_context
        self.pin_memory = torch.cuda.is_available()
        self.epoch = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch``."""
        self.epoch = epoch

    def stages(self, epoch: int) -> list[Any]:
        """The pipeline stages of one epoch, in order (the workers' part: they yield uint8 batches)."""
        health = StreamHealth()
        return [
            ShardList(self.urls),
            wds.pipelinefilter(_split_by_rank)(self.rank, self.world_size),
            _split_by_worker,
            RepeatShards(self.seed, epoch, self.rank, health),
            wds.pipelinefilter(_tar_to_samples)(health),
            wds.pipelinefilter(_count_samples)(health),
            SeededShuffle(self.shuffle_buffer, self.seed, epoch, self.rank),
            wds.pipelinefilter(_decode_images)(health),
            wds.batched(self.batch_size, collation_fn=_stack, partial=False),
            RandomFlipShift(self.seed, epoch, self.rank) if self.augment else None,
        ]

    def pipeline(self, epoch: int) -> wds.DataPipeline:
        """The WebDataset pipeline of one epoch, uint8 batches (endless; the loader cuts it and normalizes)."""
        return wds.DataPipeline(*self.stages(epoch))

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        # A new DataLoader per epoch hands the epoch's seeds to fresh workers; the cost (starting workers)
        # is small next to an epoch of training. Workers set torch's threads to 1 themselves (torch does so
        # in every DataLoader worker), so they start no thread pools of their own.
        _png_decoder()  # imported here once, not by every forked worker of every epoch
        options: dict[str, Any] = {}
        if self.num_workers > 0:
            options = {"prefetch_factor": PREFETCH_BATCHES, "multiprocessing_context": self.multiprocessing_context}
        loader = DataLoader(self.pipeline(epoch), batch_size=None, num_workers=self.num_workers, **options)
        produced = 0
        for batch in islice(loader, self.batches_per_epoch):
            produced += 1
            yield self.normalize(batch, pin_memory=self.pin_memory)
        if produced < self.batches_per_epoch:
            raise DataError(
                f"the data stream of rank {self.rank} ended after {produced} of {self.batches_per_epoch} "
                "batches; the shards are damaged. Write them again with `hpcq shards`."
            )


def unlabelled_loader(
    urls: list[str],
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    num_workers: int,
    batches_per_epoch: int,
    shuffle_buffer: int,
    seed: int,
    augment: bool,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    multiprocessing_context: str | None = None,
) -> UnlabelledLoader:
    """Stream unlabelled PNG shards as normalized float batches (B, C, H, W) for one DDP rank.

    Args:
        urls: shard paths (see shard_urls); at least world_size * max(1, num_workers) of them.
        batch_size: images per batch (per rank).
        rank, world_size: this process's place in the job; each rank reads a disjoint subset of shards.
        num_workers: DataLoader worker processes (0 reads in this process).
        batches_per_epoch: every iteration yields exactly this many batches on every rank.
        shuffle_buffer: samples held for shuffling (0 or 1: no shuffling).
        seed: base seed; shard order, shuffling and augmentation depend on (seed, epoch, rank, worker).
        augment: random horizontal flips and small shifts.
        mean, std: normalization, one value or one per channel.
        multiprocessing_context: how the DataLoader workers start ("fork", "spawn", "forkserver"); None:
            torch's default, which is the start method of this process, so "spawn" in a process that
            was itself spawned (as some DDP launchers do), at the cost of re-importing torch in every
            worker every epoch (about a second on a small CPU); "fork" avoids that on Linux.

    Raises:
        DataError: too few shards for the ranks and workers, an unknown multiprocessing_context, or
            invalid sizes.
    """
    return UnlabelledLoader(
        urls,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        batches_per_epoch=batches_per_epoch,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        augment=augment,
        mean=mean,
        std=std,
        multiprocessing_context=multiprocessing_context,
    )


def finite_unlabelled_batches(
    urls: list[str],
    *,
    batch_size: int,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
) -> wds.DataPipeline:
    """One pass over all shards in order, in this process, as normalized float batches (B, C, H, W).

    For evaluation (e.g. label-free fidelity): no shuffling, no augmentation, the last batch may be
    smaller; bad samples are counted and skipped as in unlabelled_loader. Iterating again repeats the
    same pass.

    Raises:
        DataError: no shards, or invalid sizes.
    """
    _check_counts(batch_size=batch_size)
    if not urls:
        raise DataError("no shards given; write them with `hpcq shards`.")
    health = StreamHealth()
    return wds.DataPipeline(
        ShardList(urls),
        _as_url_dicts,
        wds.pipelinefilter(_tar_to_samples)(health),
        wds.pipelinefilter(_decode_images)(health),
        wds.batched(batch_size, collation_fn=_stack, partial=True),
        wds.map(Normalize(mean, std)),
    )


def _as_url_dicts(src: Iterable[str]) -> Iterator[dict[str, str]]:
    for url in src:
        yield {"url": url}


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")
