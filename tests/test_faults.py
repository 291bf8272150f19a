"""Faults and stale state: each gets a clear error or is redone, never silently reused."""

import json

import pytest
import torch

from hpcq.cli import main
from hpcq.config import load_config
from hpcq.errors import ConfigError, DataError
from hpcq.manifest import build_manifest
from hpcq.pipeline import discard_retraining, prepare_stage, quantize_stage, select_stage, sweep_stage
from hpcq.quantize import Plan
from hpcq.rundir import open_run_dir
from hpcq.zoo import fashion_vgg

from .conftest import SMALL_KWARGS, requires_fashion
from .test_cli import write_spec


def test_shards_of_another_source_are_not_reused(tmp_path, small_checkpoint, image_folder):
    from hpcq.datasets import ensure_unlabelled_shards

    first = load_config(write_spec(tmp_path, small_checkpoint, image_folder))
    ensure_unlabelled_shards(first)
    other = image_folder.parent / "other"
    (other / "x").mkdir(parents=True)
    for png in sorted(image_folder.rglob("*.png"))[:12]:
        (other / "x" / png.name).write_bytes(png.read_bytes())
    second = load_config(write_spec(tmp_path, small_checkpoint, other))
    with pytest.raises(DataError):
        ensure_unlabelled_shards(second)  # same shard_dir, different source: refused, not reused


def test_default_shard_folders_differ_by_source(tmp_path):
    from hpcq.datasets import unlabelled_shard_dir

    a = load_config(None, [f"data.unlabelled={tmp_path / 'a' / 'png'}"])
    b = load_config(None, [f"data.unlabelled={tmp_path / 'b' / 'png'}"])
    assert unlabelled_shard_dir(a) != unlabelled_shard_dir(b)


def test_wrong_input_shape_is_a_config_error():
    with pytest.raises(ConfigError, match="model.input_shape"):
        build_manifest(fashion_vgg(**SMALL_KWARGS), torch.zeros(1, 3, 224, 224))
    assert main(["layers", "vgg16", "--input-shape", "1,28,28"]) == 2


def test_a_corrected_spec_may_reuse_a_directory_where_nothing_was_computed(tmp_path, small_checkpoint, image_folder):
    spec = write_spec(tmp_path, small_checkpoint, image_folder, data={"unlabelled": str(tmp_path / "missing")})
    assert main(["run", str(spec)]) == 2  # the unlabelled folder does not exist
    spec = write_spec(tmp_path, small_checkpoint, image_folder)
    open_run_dir(load_config(spec))  # accepted: only config.yaml was there
    (tmp_path / "run" / "manifest.json").write_text("[]")
    with pytest.raises(ConfigError, match="different spec"):
        open_run_dir(load_config(spec, ["seed=5"]))


def test_report_before_quantize_says_what_to_do(tmp_path, small_checkpoint, image_folder, caplog):
    spec = write_spec(tmp_path, small_checkpoint, image_folder)
    assert main(["report", str(spec)]) == 2
    assert "hpcq quantize" in caplog.text


@requires_fashion
def test_stale_state_is_redone(tmp_path, small_checkpoint, image_folder):
    spec = write_spec(tmp_path, small_checkpoint, image_folder,
                      sweep={"executor": "debug", "ks": [2, 16], "layers": "6", "eval_images": 500,
                             "fidelity_images": 8},
                      select={"plan": "auto", "max_accuracy_drop": 100.0}, quantize={"biases": {}})
    config = load_config(spec)
    run = open_run_dir(config)
    prepared = prepare_stage(config, run, progress=False)
    results, baseline = sweep_stage(config, run, prepared, progress=False)
    plan = select_stage(config, run, prepared, results, baseline)
    assert plan.weights == {"classifier.4": 2}

    # The sweep results changed (a task now failed): the saved selection is not trusted.
    changed = [dict(r, status="failed") if r["k"] == 2 else r for r in results]
    assert select_stage(config, run, prepared, changed, baseline).weights == {"classifier.4": 16}
    saved = json.loads((run.root / "selection.json").read_text())
    assert "classifier.4:2:failed" in saved["basis"]

    # A new quantization removes retrained models made from the old one.
    quantize_stage(config, run, prepared, plan, progress=False)
    (run.root / "label_free.hpcq").write_bytes(b"old")
    (run.root / "retrain-label_free.json").write_text("{}")
    (run.root / "checkpoints" / "label_free").mkdir(parents=True)
    quantize_stage(config, run, prepared, Plan(weights={"classifier.4": 16}), progress=False)
    assert not (run.root / "label_free.hpcq").exists() and not (run.root / "checkpoints").exists()
    discard_retraining(run)  # nothing left to remove: no error


def test_biases_alone_breaking_the_budget_are_named(tmp_path, image_folder):
    # Output biases far apart decide every prediction; one shared centroid for them changes most of them.
    torch.manual_seed(0)
    state = fashion_vgg(**SMALL_KWARGS).state_dict()
    state["classifier.7.bias"] = torch.linspace(10.0, -10.0, 10)
    checkpoint = tmp_path / "biased.pt"
    torch.save(state, checkpoint)
    spec = write_spec(tmp_path, checkpoint, image_folder, data={"labelled": "none"},
                      sweep={"executor": "debug", "ks": [16], "layers": "6", "fidelity_images": 8},
                      select={"plan": "auto", "metric": "fidelity", "min_agreement_pct": 90.0},
                      quantize={"biases": {"7": 1}}, retrain={"labelled_baseline": False})
    config = load_config(spec)
    run = open_run_dir(config)
    prepared = prepare_stage(config, run, progress=False)
    results, baseline = sweep_stage(config, run, prepared, progress=False)
    with pytest.raises(ConfigError, match="quantize.biases"):
        select_stage(config, run, prepared, results, baseline)


def test_a_changed_teacher_checkpoint_is_refused(tmp_path, small_checkpoint, image_folder):
    spec = write_spec(tmp_path, small_checkpoint, image_folder)
    config = load_config(spec)
    prepare_stage(config, open_run_dir(config), progress=False)
    prepare_stage(config, open_run_dir(config), progress=False)  # same weights: fine
    state = torch.load(small_checkpoint, weights_only=True)
    state["classifier.7.bias"] += 1.0
    torch.save(state, small_checkpoint)
    with pytest.raises(ConfigError, match="changed since"):
        prepare_stage(config, open_run_dir(config), progress=False)


def test_a_factory_without_checkpoint_gives_the_same_weights_every_time():
    from hpcq.models import load_model

    source = {"kind": "factory", "factory": "hpcq.zoo:fashion_vgg", "kwargs": SMALL_KWARGS}
    a, b = load_model(source), load_model(source)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
