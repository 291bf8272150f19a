"""Tests of hpcq.data: IDX parsing, image preparation, shard writing and the unlabelled loader."""

from __future__ import annotations

import gzip
import io
import itertools
import logging
import math
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from hpcq.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    OPENCLIPART_ROOT,
    BadImageError,
    fashion_mnist_samples,
    finite_unlabelled_batches,
    image_folder_samples,
    list_images,
    load_fashion_mnist,
    prepare_image,
    read_idx,
    read_shard_manifest,
    shard_urls,
    train_validation_indices,
    unlabelled_loader,
    write_shards,
)
from hpcq.data.fashion_mnist import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from hpcq.data.loaders import SeededShuffle, flip_shift
from hpcq.errors import DataError

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)",
)
needs_openclipart = pytest.mark.skipif(
    not OPENCLIPART_ROOT.is_dir(),
    reason=f"openclipart not installed at {OPENCLIPART_ROOT} (apt-get install openclipart-png)",
)


# --- helpers ---------------------------------------------------------------------------------------------


def write_idx(path: Path, magic: int, array: np.ndarray, *, cut: int = 0) -> Path:
    """Write ``array`` as a gzipped IDX file, dropping the last ``cut`` bytes."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw[: len(raw) - cut]))
    return path


def write_tiny_fashion(root: Path, split_prefix: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    write_idx(root / f"{split_prefix}-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC, images)
    write_idx(root / f"{split_prefix}-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC, labels)
    return images, labels


def make_image_folder(root: Path, n: int) -> Path:
    """n square gray PNGs, image i filled with gray value 10 + 3 i (so a pixel identifies its image)."""
    for i in range(n):
        sub = root / f"topic{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("L", (20, 20), 10 + 3 * i).save(sub / f"img.{i:03d}.png")
    return root


def gray_ids(batch: torch.Tensor) -> list[int]:
    """Image ids of a batch made from make_image_folder images with mean 0, std 1 and no augmentation."""
    values = (batch[:, 0, 10, 10] * 255).round().int().tolist()
    return [(v - 10) // 3 for v in values]


def tar_members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def read_shard(shard: Path | str) -> list[dict[str, object]]:
    """The samples of one shard, read with tarfile (not webdataset): key, gray image, label if any."""
    rows: dict[str, dict[str, object]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, suffix = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            row = rows.setdefault(key, {"__key__": key})
            row[suffix] = np.array(Image.open(io.BytesIO(data))) if suffix == "png" else int(data)
    return list(rows.values())


# --- Fashion-MNIST ----------------------------------------------------------------------------------------


def test_read_idx_round_trip(tmp_path: Path) -> None:
    images = np.arange(3 * 28 * 28, dtype=np.int64).reshape(3, 28, 28) % 256
    path = write_idx(tmp_path / "x-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC, images)
    result = read_idx(path, IDX_IMAGES_MAGIC)
    assert result.dtype == np.uint8 and result.shape == (3, 28, 28)
    np.testing.assert_array_equal(result, images)


def test_read_idx_truncated(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "t.gz", IDX_IMAGES_MAGIC, np.zeros((2, 28, 28)), cut=1)
    with pytest.raises(DataError, match=r"t\.gz is truncated"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "h.gz"
    path.write_bytes(gzip.compress(IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"\0\0"))
    with pytest.raises(DataError, match=r"h\.gz is truncated"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", IDX_LABELS_MAGIC, np.zeros(5))
    with pytest.raises(DataError, match=r"labels\.gz has IDX magic number 2049, expected 2051"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_read_idx_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "plain.gz"
    path.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"plain\.gz is not a readable gzip file"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_read_idx_gzip_cut_short(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "cut.gz", IDX_IMAGES_MAGIC, np.zeros((2, 28, 28)))
    path.write_bytes(path.read_bytes()[:-12])  # damages the gzip stream itself
    with pytest.raises(DataError, match=r"cut\.gz"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_load_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_load_fashion_mnist_bad_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="valid splits: train, test"):
        load_fashion_mnist("validation", tmp_path)


def test_load_fashion_mnist_from_tiny_files(tmp_path: Path) -> None:
    images, labels = write_tiny_fashion(tmp_path, "t10k", 12)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.dtype == torch.uint8 and x.shape == (12, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (12,)
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_load_fashion_mnist_mismatched_counts(tmp_path: Path) -> None:
    write_tiny_fashion(tmp_path, "train", 4)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", IDX_LABELS_MAGIC, np.zeros(3))
    with pytest.raises(DataError, match="4 images but .* 3 labels"):
        load_fashion_mnist("train", tmp_path)


@pytest.mark.realdata
@needs_fashion_mnist
def test_real_fashion_mnist() -> None:
    x_train, y_train = load_fashion_mnist("train")
    x_test, y_test = load_fashion_mnist("test")
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    assert int(y_train.min()) == 0 and int(y_train.max()) == len(FASHION_MNIST_CLASSES) - 1
    assert torch.bincount(y_test).tolist() == [1000] * 10


def test_train_validation_indices() -> None:
    train, validation = train_validation_indices(1000, 100, seed=3)
    assert len(train) == 900 and len(validation) == 100
    assert not set(train.tolist()) & set(validation.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, validation])), np.arange(1000))
    again_train, again_validation = train_validation_indices(1000, 100, seed=3)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(validation, again_validation)
    _, other = train_validation_indices(1000, 100, seed=4)
    assert not np.array_equal(validation, other)
    with pytest.raises(DataError, match="validation_size"):
        train_validation_indices(10, 10, seed=0)


# --- images -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [40, 800])  # 800: large enough to be box-reduced before compositing
def test_prepare_image_alpha_on_black(tmp_path: Path, width: int) -> None:
    rgba = np.zeros((width // 2, width, 4), dtype=np.uint8)
    rgba[:, : width // 2] = (255, 0, 0, 255)  # opaque red left half
    rgba[:, width // 2 :] = (255, 255, 255, 0)  # transparent white right half: must come out black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    rgb = prepare_image(path, 16, 3)
    assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
    assert rgb[8, 3].tolist()[0] > 200 and rgb[8, 3].tolist()[1:] == [0, 0]  # red kept
    assert rgb[8, 13].max() == 0  # transparent part is black
    assert rgb[0].max() == 0 and rgb[15].max() == 0  # 2:1 image padded top and bottom with black

    gray = prepare_image(path.read_bytes(), 16, 1)
    assert gray.dtype == np.uint8 and gray.shape == (16, 16)
    assert gray[8, 3] > 50 and gray[8, 13] == 0


def test_prepare_image_palette_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    path = tmp_path / "p.png"
    image.save(path, transparency=1)  # the white palette entry is transparent
    assert prepare_image(path, 8, 1).max() == 0


def test_prepare_image_corrupt(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="cannot decode image"):
        prepare_image(b"\x89PNG\r\n\x1a\nnot really a png", 28, 1)
    good = tmp_path / "good.png"
    Image.new("RGB", (30, 30), (1, 2, 3)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(BadImageError, match="truncated.png"):
        prepare_image(truncated, 28, 1)
    with pytest.raises(BadImageError):
        prepare_image(tmp_path / "missing.png", 28, 1)
    with pytest.raises(DataError, match="channels must be 1"):
        prepare_image(good, 28, 2)


def test_list_images(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "link.png").symlink_to(tmp_path / "imgs" / "topic0" / "img.000.png")
    paths = list_images(tmp_path / "imgs")
    relative = [p.relative_to(tmp_path / "imgs").as_posix() for p in paths]
    # sorted, no text file, and the link to an image already listed is dropped
    assert relative == [
        "topic0/img.000.png",
        "topic0/img.003.png",
        "topic1/img.001.png",
        "topic2/img.002.png",
    ]
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        list_images(tmp_path / "empty")


# --- shards -----------------------------------------------------------------------------------------------


def test_write_shards_from_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "imgs", 7)
    (root / "topic1" / "broken.png").write_bytes(b"garbage, not an image")
    out = tmp_path / "shards"
    description = {"source": str(root), "image_size": 12, "channels": 1}

    with caplog.at_level(logging.WARNING):
        report = write_shards(image_folder_samples(root, 12, 1), out, 3, description=description)
    assert "broken.png" in caplog.text
    assert report.written == 7 and report.bad == 1 and not report.reused and not report.labelled
    assert report.bad_examples[0]["source"].endswith("topic1/broken.png")
    assert len(report.shards) == math.ceil(7 / 3)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + report.shards
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # temporary folder gone

    manifest = read_shard_manifest(out)
    assert manifest.written == 7 and manifest.bad == 1 and manifest.shards == report.shards
    assert manifest.description == {**description, "shard_size": 3}

    members = [name for shard in report.shards for name in tar_members(out / shard)]
    assert len(members) == 7 and all(name.endswith(".png") for name in members)
    assert all(name.count(".") == 1 for name in members)  # keys carry no dots ("img.003" -> "img_003")
    assert "topic0_img_003.png" in members
    first = read_shard(out / report.shards[0])[0]
    assert first["png"].shape == (12, 12) and first["png"].dtype == np.uint8

    urls = shard_urls(out)
    assert urls == [str((out / name).resolve()) for name in report.shards]

    # a second run with the same description reuses the shards without touching them
    mtimes = [(out / name).stat().st_mtime_ns for name in report.shards]
    again = write_shards(image_folder_samples(root, 12, 1), out, 3, description=description)
    assert again.reused and again.written == 7 and again.shards == report.shards
    assert [(out / name).stat().st_mtime_ns for name in report.shards] == mtimes

    with pytest.raises(DataError, match="another description.*choose another folder or delete it"):
        write_shards(image_folder_samples(root, 16, 1), out, 3, description={**description, "image_size": 16})
    with pytest.raises(DataError, match="another description"):
        write_shards(image_folder_samples(root, 12, 1), out, 2, description=description)


def test_write_shards_all_bad(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="no sample could be written"):
        write_shards(image_folder_samples(root, 8, 1), tmp_path / "out", 2, description={"source": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]  # no folder left behind


def test_write_shards_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="shard_size must be at least 1"):
        write_shards([], tmp_path / "out", 0, description={})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a shard folder"):
        write_shards([], foreign, 2, description={})
    with pytest.raises(DataError, match="run `hpcq shards`|with `hpcq shards`"):
        shard_urls(tmp_path / "nowhere")


def test_fashion_mnist_samples_labelled(tmp_path: Path) -> None:
    images, labels = write_tiny_fashion(tmp_path / "fm", "train", 10)
    samples = fashion_mnist_samples("train", [2, 7], root=tmp_path / "fm")
    report = write_shards(samples, tmp_path / "out", 5, description={"source": "fashion-mnist"})
    assert report.labelled and report.written == 2 and len(report.shards) == 1
    rows = [row for url in shard_urls(tmp_path / "out") for row in read_shard(url)]
    assert [row["__key__"] for row in rows] == ["train-00002", "train-00007"]
    assert [int(row["cls"]) for row in rows] == [int(labels[2]), int(labels[7])]
    np.testing.assert_array_equal(rows[1]["png"], images[7])


@pytest.mark.realdata
@needs_openclipart
def test_real_openclipart_images(tmp_path: Path) -> None:
    samples = itertools.islice(image_folder_samples(OPENCLIPART_ROOT, 28, 1), 25)
    report = write_shards(
        samples, tmp_path / "clip", 10, description={"source": "openclipart", "image_size": 28}
    )
    assert report.written + report.bad == 25 and report.written > 0
    assert len(report.shards) == math.ceil(report.written / 10)
    image = prepare_image(list_images(OPENCLIPART_ROOT)[0], 32, 3)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


# --- unlabelled loader ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def id_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """24 images (gray value identifies each) in 8 shards of 3, written in key order."""
    base = tmp_path_factory.mktemp("loader")
    root = make_image_folder(base / "imgs", 24)
    write_shards(image_folder_samples(root, 20, 1), base / "shards", 3, description={"source": "ids"})
    return shard_urls(base / "shards")


def loader_for(urls: list[str], rank: int, **overrides: object):
    options = dict(
        batch_size=4,
        rank=rank,
        world_size=2,
        num_workers=0,
        batches_per_epoch=5,
        shuffle_buffer=4,
        seed=0,
        augment=False,
        mean=0.0,
        std=1.0,
    )
    options.update(overrides)
    return unlabelled_loader(urls, **options)


def shard_ids(urls: list[str], indices: list[int]) -> set[int]:
    ids = set()
    for index in indices:
        for row in read_shard(urls[index]):
            ids.add((int(row["png"][10, 10]) - 10) // 3)
    return ids


def test_loader_ranks_disjoint_and_equal_length(id_shards: list[str]) -> None:
    seen = []
    for rank in (0, 1):
        batches = list(loader_for(id_shards, rank))
        assert len(batches) == 5  # 20 images from the rank's 12: the shard stream repeats
        assert all(b.shape == (4, 1, 20, 20) and b.dtype == torch.float32 for b in batches)
        seen.append({i for b in batches for i in gray_ids(b)})
    assert not seen[0] & seen[1]
    assert seen[0] <= shard_ids(id_shards, [0, 2, 4, 6]) and seen[1] <= shard_ids(id_shards, [1, 3, 5, 7])


def test_loader_without_shuffle_covers_its_shards(id_shards: list[str]) -> None:
    ids = [i for b in loader_for(id_shards, 1, shuffle_buffer=0, batches_per_epoch=3) for i in gray_ids(b)]
    assert set(ids) == shard_ids(id_shards, [1, 3, 5, 7]) and len(ids) == 12


def test_loader_epochs_and_seeds(id_shards: list[str]) -> None:
    loader = loader_for(id_shards, 0, batches_per_epoch=3)
    first, second = ([i for b in loader for i in gray_ids(b)] for _ in range(2))
    assert first != second  # a new order every epoch
    loader.set_epoch(0)
    assert [i for b in loader for i in gray_ids(b)] == first  # and the same one for the same epoch


def test_loader_with_workers_and_augmentation(id_shards: list[str]) -> None:
    loader = loader_for(id_shards, 0, num_workers=2, augment=True, mean=0.5, std=0.25, batches_per_epoch=4)
    batches = list(loader)
    assert len(loader) == 4 and len(batches) == 4
    assert all(b.shape == (4, 1, 20, 20) for b in batches)
    pickle.dumps(loader.pipeline(0))  # every stage is picklable (spawn / forkserver workers)


def test_finite_batches_one_ordered_pass(id_shards: list[str]) -> None:
    batches = finite_unlabelled_batches(id_shards, batch_size=5, mean=0.0, std=1.0)
    first = list(batches)
    assert [b.shape[0] for b in first] == [5, 5, 5, 5, 4]  # all 24 images, last batch partial
    expected = [(int(row["png"][10, 10]) - 10) // 3 for url in id_shards for row in read_shard(url)]
    assert [i for b in first for i in gray_ids(b)] == expected  # shard order, no shuffling
    assert [i for b in batches for i in gray_ids(b)] == expected  # iterating again repeats the pass


def test_loader_skips_bad_samples(
    tmp_path: Path, id_shards: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    bad_shard = tmp_path / "bad.tar"
    with wds.TarWriter(str(bad_shard), encoder=False) as sink:
        sink.write({"__key__": "broken", "png": b"not a png"})
    truncated_shard = tmp_path / "truncated.tar"
    truncated_shard.write_bytes(Path(id_shards[1]).read_bytes()[:1500])
    urls = [str(bad_shard), str(truncated_shard)] + id_shards[2:]
    with caplog.at_level(logging.WARNING):
        batches = list(loader_for(urls, 0, world_size=1, batches_per_epoch=8))
    assert len(batches) == 8
    assert "skipping bad sample" in caplog.text and "broken" in caplog.text
    assert "truncated.tar" in caplog.text


def test_loader_all_bad_shards_fail_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(DataError, match="gave no sample"):
        list(loader_for([str(empty)], 0, world_size=1))


def test_loader_refuses_too_few_shards(id_shards: list[str]) -> None:
    with pytest.raises(DataError, match=r"8 shards .* at least 12 .*--shard-size"):
        loader_for(id_shards, 0, world_size=3, num_workers=4)
    with pytest.raises(DataError, match="rank must be in 0..1"):
        loader_for(id_shards, 2)
    with pytest.raises(DataError, match="std must be positive"):
        loader_for(id_shards, 0, std=0.0)


@pytest.fixture(scope="module")
def noise_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """16 random-noise RGB images of 6 x 7 pixels in 4 shards of 4."""
    base = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(5)
    urls = []
    for shard in range(4):
        url = str(base / f"noise-{shard}.tar")
        with wds.TarWriter(url, encoder=False) as sink:
            for i in range(4):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)).save(buffer, format="PNG")
                sink.write({"__key__": f"img{4 * shard + i:03d}", "png": buffer.getvalue()})
        urls.append(url)
    return urls


NOISE_MEAN, NOISE_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def float_reference(sample: dict) -> torch.Tensor:
    """The straightforward float pipeline: decode, to float, / 255, normalize, one image at a time."""
    array = np.array(Image.open(io.BytesIO(sample["png"])))
    image = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    return (image - torch.tensor(NOISE_MEAN).view(3, 1, 1)) / torch.tensor(NOISE_STD).view(3, 1, 1)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_batches_equal_the_float_pipeline(noise_shards: list[str], num_workers: int) -> None:
    loader = unlabelled_loader(noise_shards, batch_size=3, rank=0, world_size=1, num_workers=num_workers,
                               batches_per_epoch=7, shuffle_buffer=5, seed=2, augment=False, mean=NOISE_MEAN,
                               std=NOISE_STD)
    for epoch in (0, 3):
        loader.set_epoch(epoch)
        batches = list(loader)
        # The same samples in the same order: the epoch's stages up to the shuffle, then the float pipeline.
        stages = loader.stages(epoch)
        shuffled = next(i for i, stage in enumerate(stages) if isinstance(stage, SeededShuffle)) + 1
        samples = itertools.islice(wds.DataPipeline(*stages[:shuffled]), 7 * 3)
        expected = torch.stack([float_reference(sample) for sample in samples]).split(3)
        assert len(batches) == 7
        for batch, want in zip(batches, expected, strict=True):
            assert batch.dtype == torch.float32 and batch.shape == (3, 3, 6, 7)
            assert torch.equal(batch, want)
    assert batch.min() < -1 and batch.max() > 1  # normalized, not in [0, 1]

    finite = list(finite_unlabelled_batches(noise_shards, batch_size=5, mean=NOISE_MEAN, std=NOISE_STD))
    in_order = [float_reference(row) for url in noise_shards for row in wds.WebDataset(url, shardshuffle=False)]
    assert [b.shape[0] for b in finite] == [5, 5, 5, 1] and all(b.dtype == torch.float32 for b in finite)
    assert torch.equal(torch.cat(finite), torch.stack(in_order))


def test_loader_pipeline_stays_uint8(noise_shards: list[str]) -> None:
    loader = unlabelled_loader(noise_shards, batch_size=4, rank=0, world_size=1, num_workers=0,
                               batches_per_epoch=2, shuffle_buffer=0, seed=0, augment=True, mean=0.5, std=0.5)
    batch = next(iter(loader.pipeline(0)))  # what the workers hand over
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 6, 7)


@pytest.mark.parametrize("shape", [(6, 1, 20, 20), (5, 3, 9, 13)])
def test_flip_shift_is_a_flip_then_a_padded_shift(shape: tuple[int, ...]) -> None:
    batch = torch.randint(1, 256, shape, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    out = flip_shift(batch, generator)
    generator.set_state(state)  # the same draws, applied one image at a time
    size, _, height, width = shape
    pad = max(1, round(0.1 * min(height, width)))
    flips = (torch.rand(size, generator=generator) < 0.5).tolist()
    tops, lefts = torch.randint(0, 2 * pad + 1, (2, size), generator=generator).tolist()
    for image, result, flip, top, left in zip(batch, out, flips, tops, lefts, strict=True):
        image = image.flip(-1) if flip else image
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        assert torch.equal(result, padded[:, top : top + height, left : left + width])
    assert out.dtype == torch.uint8


def test_loader_augmentation_pads_with_black(id_shards: list[str]) -> None:
    # each id image is one gray value: after flips and shifts, only that value and black (0) remain
    batches = list(loader_for(id_shards, 0, augment=True, batches_per_epoch=6))
    shifted = 0
    for batch in batches:
        assert batch.dtype == torch.float32
        for image in batch:
            values = set(image.unique().tolist())
            assert values <= {0.0, float(image.max())} and image.max() > 0
            shifted += 0.0 in values
    assert shifted > len(batches) * 4 // 2  # most images are shifted (1 in 25 is not)


def test_loader_multiprocessing_context(id_shards: list[str]) -> None:
    with pytest.raises(DataError, match="multiprocessing_context must be one of .*fork.*got 'thread'"):
        loader_for(id_shards, 0, multiprocessing_context="thread")
    spawned = list(loader_for(id_shards, 0, num_workers=1, multiprocessing_context="spawn", batches_per_epoch=2))
    in_process = list(loader_for(id_shards, 0, num_workers=0, batches_per_epoch=2))
    assert all(torch.equal(a, b) for a, b in zip(spawned, in_process, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_pins_batches_with_cuda(id_shards: list[str]) -> None:
    batch = next(iter(loader_for(id_shards, 0, num_workers=1)))
    assert batch.is_pinned() and batch.dtype == torch.float32
