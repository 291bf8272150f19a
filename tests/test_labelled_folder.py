"""Labelled image folders (ImageNet's layout) for evaluation: listing, transform, subsets, bad images,
errors, and a run whose sweep, selection and report use them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcq.cli import main
from hpcq.config import load_config
from hpcq.data import load_fashion_mnist
from hpcq.data.labelled_folder import LabelledFolderBatches, evaluation_image, read_labelled_folder
from hpcq.data.memory import normalize
from hpcq.datasets import check_labelled_folders, validation_batches
from hpcq.errors import ConfigError, DataError

from .conftest import FASHION_ROOT, requires_fashion
from .test_cli import write_spec

MEAN, STD = (0.2860,), (0.3530,)


def fashion_folder(root: Path, first: int, count: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """Fashion-MNIST test images first..first+count as PNGs under root/class_NN/; the images and labels."""
    images, labels = load_fashion_mnist("test", FASHION_ROOT)
    images, labels = images[first:first + count].numpy(), labels[first:first + count].numpy()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{first + i:05d}.png")
    return root, images, labels


@requires_fashion
def test_folder_batches_equal_the_in_memory_images_in_class_order(tmp_path):
    root, images, labels = fashion_folder(tmp_path / "val", 0, 120)
    folder = read_labelled_folder(root, expected_classes=10)
    assert folder.classes == tuple(f"class_{i:02d}" for i in range(10)) and len(folder.samples) == 120
    batches = list(LabelledFolderBatches(folder, image_size=28, resize=0, channels=1, mean=MEAN, std=STD,
                                         batch_size=50, workers=2))
    got_images = torch.cat([b[0] for b in batches])
    got_labels = torch.cat([b[1] for b in batches])
    # The folder lists class by class; compare with the same images in that order.
    order = sorted(range(120), key=lambda i: (labels[i], i))
    assert torch.equal(got_labels, torch.from_numpy(labels[order]).long())
    assert torch.equal(got_images, normalize(torch.from_numpy(images[order]), MEAN, STD))


def test_transform_resizes_the_short_side_then_crops_the_centre(tmp_path):
    pixels = np.zeros((60, 90, 3), dtype=np.uint8)
    pixels[:, 40:50] = (255, 0, 0)  # a red band in the middle column
    Image.fromarray(pixels, "RGB").save(tmp_path / "wide.png")
    out = evaluation_image(tmp_path / "wide.png", image_size=20, resize=30, channels=3)
    assert out.shape == (20, 20, 3)  # 60x90 -> 30x45 -> central 20x20
    assert out[:, 10, 0].min() > 200 and out[:, 0, 0].max() == 0 and out[:, 19, 0].max() == 0
    assert evaluation_image(tmp_path / "wide.png", image_size=20, resize=30, channels=1).shape == (20, 20)


def test_subset_is_seeded_and_spans_the_classes(tmp_path):
    for c in range(5):
        (tmp_path / f"c{c}").mkdir()
        for i in range(20):
            Image.new("L", (4, 4), i).save(tmp_path / f"c{c}" / f"{i}.png")
    folder = read_labelled_folder(tmp_path)
    a, b = folder.subset(25, seed=3), folder.subset(25, seed=3)
    assert a == b and len(a.samples) == 25 and {label for _, label in a.samples} == set(range(5))
    assert folder.subset(25, seed=4) != a and folder.subset(1000, seed=3) == folder


def test_undecodable_images_are_skipped_and_counted(tmp_path, caplog):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    batches = LabelledFolderBatches(read_labelled_folder(tmp_path), image_size=8, resize=0, channels=3,
                                    mean=(0.5,), std=(0.5,), batch_size=4, workers=0)
    labels = torch.cat([labels for _, labels in batches])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and batches.bad_images == 1
    assert "broken.png" in caplog.text and "1 of 7 images" in caplog.text


def test_folder_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        read_labelled_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no class subfolders"):
        read_labelled_folder(tmp_path)
    (tmp_path / "only").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "only" / "x.png")
    with pytest.raises(DataError, match="1 class subfolders but the model has 10 outputs"):
        read_labelled_folder(tmp_path, expected_classes=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        read_labelled_folder(tmp_path)


def test_config_errors_for_image_folders(tmp_path, small_checkpoint, image_folder):
    empty = tmp_path / "labelled"
    empty.mkdir()
    base = {"labelled": "imagefolder", "labelled_validation": str(empty), "labelled_test": str(empty)}
    retrain = {"retrain": {"labelled_baseline": False}}
    spec = write_spec(tmp_path, small_checkpoint, image_folder, data={"labelled": "imagefolder"}, **retrain)
    with pytest.raises(ConfigError, match="needs data.labelled_validation"):
        load_config(spec)
    spec = write_spec(tmp_path, small_checkpoint, image_folder, data={**base, "labelled_resize": 20}, **retrain)
    with pytest.raises(ConfigError, match="labelled_resize .20. must be 0 or at least data.image_size"):
        load_config(spec)
    spec = write_spec(tmp_path, small_checkpoint, image_folder, data=base)
    with pytest.raises(ConfigError, match="labelled retraining baseline needs data.labelled fashion-mnist"):
        load_config(spec)
    config = load_config(write_spec(tmp_path, small_checkpoint, image_folder, data=base, **retrain))
    with pytest.raises(DataError, match="no class subfolders"):
        check_labelled_folders(config, 10)


@requires_fashion
def test_a_run_sweeps_selects_and_reports_on_image_folders(tmp_path, small_checkpoint, image_folder, capsys):
    validation, _, _ = fashion_folder(tmp_path / "val", 0, 200)
    test, _, _ = fashion_folder(tmp_path / "test", 200, 150)
    (test / "class_03" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\ncut short")
    spec = write_spec(
        tmp_path, small_checkpoint, image_folder,
        data={"labelled": "imagefolder", "labelled_validation": str(validation), "labelled_test": str(test),
              "eval_workers": 0},
        select={"plan": "auto", "max_accuracy_drop": 100.0},
        sweep={"executor": "debug", "ks": [4], "layers": "5-6", "eval_images": 120, "fidelity_images": 8},
        retrain={"labelled_baseline": False},
    )
    assert main(["run", str(spec)]) == 0
    run = tmp_path / "run"
    sweep = [json.loads(p.read_text()) for p in (run / "sweep" / "tasks").glob("*.json")]
    assert sweep and all(r["val"]["count"] == 120 for r in sweep)  # a seeded subset of the validation folder
    config = load_config(spec)
    assert sum(labels.numel() for _, labels in validation_batches(config, 120)) == 120
    assert len(list((run / "labelled").glob("*.json"))) == 2  # both folders listed once, for every stage
    report = json.loads((run / "report.json").read_text())
    assert report["evaluation"]["teacher"]["test"]["count"] == 150
    assert "labelled test folder" in report["note"] and "150 images; 1 undecodable images skipped" in report["note"]
    assert set(report["accuracy"]) == {"teacher", "quantized", "label_free"}
    # `hpcq evaluate` uses the same test folder.
    capsys.readouterr()
    assert main(["evaluate", str(run / "label_free.hpcq"), str(spec)]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["count"] == 150 and evaluated["top1_pct"] == report["accuracy"]["label_free"]


@pytest.mark.parametrize("size", [(300, 451), (517, 333), (256, 256), (241, 260)])
def test_transform_matches_torchvisions_resize_and_centre_crop(tmp_path, size):
    from torchvision import transforms

    pixels = np.random.default_rng(sum(size)).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels, "RGB").save(path)
    reference = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(200)])
    with Image.open(path) as image:
        expected = np.asarray(reference(image.convert("RGB")))
    assert np.array_equal(evaluation_image(path, image_size=200, resize=224, channels=3), expected)


def test_listing_is_taken_once_and_read_back(tmp_path):
    root = tmp_path / "val"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (4, 4), i).save(root / c / f"{i}.png")
    listing = tmp_path / "run" / "labelled" / "val.json"
    first = read_labelled_folder(root, 2, listing)
    assert listing.is_file() and len(first.samples) == 6
    Image.new("L", (4, 4)).save(root / "a" / "late.png")  # after the run listed the folder
    assert read_labelled_folder(root, 2, listing) == first  # the run keeps its listing
    assert len(read_labelled_folder(root, 2).samples) == 7
    with pytest.raises(DataError, match="has 2 class subfolders but the model has 3 outputs"):
        read_labelled_folder(root, 3, listing)
