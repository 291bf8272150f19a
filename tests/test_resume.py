"""Killing `hpcq run` and starting it again resumes and reaches the same plan; the real data path."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import OPENCLIPART_ROOT, requires_fashion
from .test_cli import write_spec
from .test_sweep import three_valued_checkpoint

AUTO = {"sweep": {"executor": "debug", "ks": [2, 4, 16], "layers": "5-7", "eval_images": 1000,
                  "fidelity_images": 8},
        "select": {"plan": "auto", "max_accuracy_drop": 3.0}}


def hpcq(spec: Path, *extra: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcq.cli", "run", str(spec), *extra], capture_output=True,
                          text=True, timeout=timeout)


@requires_fashion
def test_killed_run_resumes_to_the_same_plan(tmp_path, image_folder):
    checkpoint = three_valued_checkpoint(tmp_path / "model.pt")
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = write_spec(reference_dir, checkpoint, image_folder, **AUTO)
    assert hpcq(reference).returncode == 0, "uninterrupted run failed"
    expected = json.loads((reference_dir / "run" / "report.json").read_text())

    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()
    spec = write_spec(killed_dir, checkpoint, image_folder, **AUTO)
    tasks = killed_dir / "run" / "sweep" / "tasks"
    process = subprocess.Popen([sys.executable, "-m", "hpcq.cli", "run", str(spec)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(tasks.glob("*.json"))) < 3 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # mid-sweep, like a node failure
    process.wait()
    assert len(list(tasks.glob("*.json"))) < 9, "the run finished before it could be killed"
    assert not (killed_dir / "run" / "report.json").exists()

    result = hpcq(spec)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((killed_dir / "run" / "report.json").read_text())
    assert report["plan"] == expected["plan"]
    assert report["selection"]["choice"] == expected["selection"]["choice"]
    assert report["size"] == expected["size"]


@requires_fashion
@pytest.mark.skipif(not (OPENCLIPART_ROOT / "science").is_dir(),
                    reason="openclipart-png is missing: apt-get install openclipart-png (./install.sh does)")
def test_real_quickstart_data_path(tmp_path, small_checkpoint):
    """Real clip art (one category) as the unlabelled set, real Fashion-MNIST for validation and test."""
    spec = write_spec(tmp_path, small_checkpoint, OPENCLIPART_ROOT / "science",
                      data={"shard_size": 5}, sweep={**AUTO["sweep"], "layers": "6"},
                      select={"plan": "auto", "max_accuracy_drop": 100.0})
    result = hpcq(spec)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["written"] + manifest["bad"] == 21 and manifest["written"] >= 20
    assert report["evaluation"]["label_free"]["fidelity"]["count"] == manifest["written"] - 5 * (len(manifest["shards"]) - 1)
    assert report["retrain"]["label_free"]["labelled_images_used"] == 0
    assert report["accuracy"]["teacher"] > 0 and report["plan"]["weights"] == {"classifier.4": 2}
