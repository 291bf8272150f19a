"""Strict run-spec loading: unknown keys, wrong types, impossible values, overrides."""

from pathlib import Path

import pytest
import yaml

from hpcq.config import RunConfig, load_config, write_resolved_config
from hpcq.errors import ConfigError


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_load_without_a_file():
    config = load_config(None)
    assert isinstance(config, RunConfig)
    assert config.model.kind == "quickstart"
    assert config.data.channels == 1


def test_values_and_lists_become_typed(tmp_path):
    spec = write(tmp_path, {"model": {"kind": "torchvision", "name": "vgg16", "input_shape": [3, 224, 224]},
                            "kmeans": {"method": "faiss", "niter": 10}})
    config = load_config(spec)
    assert config.model.input_shape == (3, 224, 224)
    assert config.kmeans.method == "faiss" and config.kmeans.niter == 10


def test_misspelled_key_names_key_file_and_suggestion(tmp_path):
    spec = write(tmp_path, {"kmeans": {"nitre": 5}})
    with pytest.raises(ConfigError) as info:
        load_config(spec)
    message = str(info.value)
    assert "kmeans.nitre" in message and str(spec) in message and "niter" in message
    assert "Valid keys" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'retrian'"):
        load_config(write(tmp_path, {"retrian": {}}))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"kmeans": {"niter": "many"}}, "kmeans.niter: expected an integer"),
        ({"kmeans": {"method": "kmedoids"}}, "not one of ['exact', 'faiss']"),
        ({"kmeans": {"niter": 0}}, "kmeans.niter must be > 0"),
        ({"data": {"channels": 2}}, "data.channels"),
        ({"model": {"kind": "torchvision"}}, "model.name is required"),
        ({"quantize": {"weights": {"fc": 0}}}, "number of centroids >= 1"),
        ({"teacher": {"validation_size": 70000}}, "teacher.validation_size"),
        ({"seed": True}, "seed: expected an integer"),
    ],
)
def test_bad_values_are_refused_with_the_key(tmp_path, data, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    assert fragment in str(info.value)


def test_overrides_are_validated_like_the_file(tmp_path):
    spec = write(tmp_path, {"seed": 3})
    config = load_config(spec, ["kmeans.niter=7", "quantize.weights={'14-15': 32}", "run_dir=/tmp/x"])
    assert config.kmeans.niter == 7 and config.quantize.weights == {"14-15": 32} and config.seed == 3
    with pytest.raises(ConfigError, match="kmeans.nope"):
        load_config(spec, ["kmeans.nope=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(spec, ["kmeans"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(None, ["kmeans.bins=1024"])
    path = write_resolved_config(config, tmp_path)
    assert load_config(path) == config


def test_shipped_specs_load():
    for spec in sorted(Path(__file__).resolve().parents[1].glob("jobs/*.yaml")):
        load_config(spec)


def test_config_reference_lists_every_key():
    import dataclasses

    from hpcq import config as c

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for cls in (c.RunConfig, c.ModelConfig, c.TeacherConfig, c.DataConfig, c.KMeansConfig, c.QuantizeConfig,
                c.SweepConfig, c.SelectConfig, c.RetrainConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"docs/config.md does not document {cls.__name__}.{f.name}"


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["data.labelled=none"], "select.metric must be fidelity"),
    (["data.labelled=none", "select.metric=fidelity"], "labelled_baseline"),
    (["data.labelled=none", "select.metric=fidelity", "retrain.labelled_baseline=false"], "quickstart"),
    (["data.image_size=224"], "28x28 gray"),
    (["data.labelled=imagenet"], "not one of"),
])
def test_cross_section_checks(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)
