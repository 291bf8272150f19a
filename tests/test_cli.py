"""The hpcq command end to end on a small model, real Fashion-MNIST and a real image folder."""

import json
import os

import pytest
import yaml

from hpcq.artifact import load_artifact
from hpcq.cli import main

from .conftest import SMALL_KWARGS, requires_fashion


def write_spec(tmp_path, checkpoint, image_folder, **changes):
    spec = {
        "run_dir": str(tmp_path / "run"),
        "model": {"kind": "factory", "factory": "hpcq.zoo:fashion_vgg", "kwargs": SMALL_KWARGS,
                  "checkpoint": str(checkpoint), "input_shape": [1, 28, 28]},
        "teacher": {"cache_dir": str(tmp_path / "cache")},
        "data": {"unlabelled": str(image_folder), "shard_dir": str(tmp_path / "shards"), "shard_size": 8,
                 "eval_batch_size": 2000},
        "quantize": {"weights": {"5-6": 8, "conv": 16}, "biases": {"all": 1}},
        "select": {"plan": "spec"},
        "retrain": {"epochs": 1, "batches_per_epoch": 3, "batch_size": 8, "num_workers": 0,
                    "shuffle_buffer": 8, "checkpoint_every_steps": 2},
    }
    for key, value in changes.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_layers_prints_the_paper_numbering(capsys):
    assert main(["layers", "vgg16"]) == 0
    out = capsys.readouterr().out
    assert " 14  classifier.0" in out and " 15  classifier.3" in out and "16 layers" in out


def test_layers_json_and_bad_selector(capsys):
    assert main(["layers", "hpcq.zoo:fashion_vgg", "--input-shape", "1,28,28", "--json", "--select", "fc"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["number"] for r in rows] == [5, 6, 7]
    assert main(["layers", "vgg16", "--select", "17"]) == 2


def test_bad_spec_exits_2_and_writes_nothing(tmp_path, small_checkpoint, image_folder, caplog):
    spec = write_spec(tmp_path, small_checkpoint, image_folder, kmeans={"nitre": 3})
    assert main(["run", str(spec)]) == 2
    assert "kmeans.nitre" in caplog.text
    assert not (tmp_path / "run").exists()
    assert main(["run", str(spec), "--set", "kmeans=3"]) == 2


@requires_fashion
def test_run_end_to_end_then_reuse(tmp_path, small_checkpoint, image_folder, capsys):
    spec = write_spec(tmp_path, small_checkpoint, image_folder)
    assert main(["run", str(spec)]) == 0
    assert "| quantized + label-free retraining |" in capsys.readouterr().out
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    assert report["plan"]["weights"] == {"features.0": 16, "features.3": 16, "features.7": 16, "features.10": 16,
                                         "classifier.1": 8, "classifier.4": 8}
    assert set(report["accuracy"]) == {"teacher", "quantized", "label_free", "labelled"}
    assert report["evaluation"]["quantized"]["test"]["count"] == 10000
    assert report["evaluation"]["label_free"]["fidelity"]["count"] == 8  # the held-out third shard
    assert 0 < report["size"]["bitpacked_bytes"] < report["size"]["fp32_bytes"]
    assert report["size"]["reduction_bitpacked_pct"] > 80
    for key in ("fp32_bytes", "bitpacked_bytes", "entropy_coded_bytes", "reduction_bitpacked_pct",
                "reduction_entropy_pct"):
        assert key in report["size"]
    assert report["seed"] == 0
    assert {t["name"] for t in report["targets"]} >= {"label-free retraining used no labelled image"}
    assert (run / "report.md").is_file() and (run / "label_free.hpcq").is_file()
    assert yaml.safe_load((run / "config.yaml").read_text())["quantize"]["weights"]["5-6"] == 8
    loaded = load_artifact(run / "quantized.hpcq")
    assert loaded.header["plan"] == report["plan"]

    stamp = os.stat(run / "quantized.hpcq").st_mtime_ns
    assert main(["run", str(spec)]) == 0
    assert os.stat(run / "quantized.hpcq").st_mtime_ns == stamp  # reused, not fitted again
    assert json.loads((run / "report.json").read_text())["accuracy"] == report["accuracy"]

    # The same run directory with another spec is refused.
    assert main(["run", str(spec), "--set", "quantize.weights={'5-6': 4}"]) == 2

    out = tmp_path / "exported.hpcq"
    assert main(["export", str(spec), "--out", str(out)]) == 0
    assert load_artifact(out).header["plan"] == report["plan"]


@pytest.mark.parametrize("source", [pytest.param("fashion-mnist-test", marks=requires_fashion), "folder"])
def test_shards_command(tmp_path, image_folder, source, capsys):
    src = str(image_folder) if source == "folder" else source
    assert main(["shards", "--source", src, "--out", str(tmp_path / "s"), "--shard-size", "5000"]) == 0
    assert "shards at" in capsys.readouterr().out
    assert (tmp_path / "s" / "manifest.json").is_file()


def test_run_without_any_labels_uses_fidelity(tmp_path, small_checkpoint, image_folder):
    spec = write_spec(tmp_path, small_checkpoint, image_folder, data={"labelled": "none"},
                      sweep={"executor": "debug", "ks": [2, 16], "layers": "6", "fidelity_images": 8},
                      select={"plan": "auto", "metric": "fidelity", "min_agreement_pct": 1.0},
                      quantize={"biases": {}}, retrain={"labelled_baseline": False})
    assert main(["run", str(spec)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["accuracy"] == {}
    assert set(report["evaluation"]) == {"teacher", "quantized", "label_free"}
    assert report["evaluation"]["label_free"]["fidelity"]["count"] == 8
    assert report["selection"]["metric"] == "fidelity"
    assert "val" not in json.loads(next((tmp_path / "run" / "sweep" / "tasks").glob("*.json")).read_text())
