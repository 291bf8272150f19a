"""Shared fixtures: a small trained-looking model checkpoint, a tiny unlabelled image folder, and a real
single-node Slurm (slurm/start-slurm.sh) for the tests marked ``slurm``."""

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpcq.zoo import fashion_vgg

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")

requires_fashion = pytest.mark.skipif(
    not (FASHION_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (./install.sh does)",
)

SMALL_KWARGS = {"width": 4, "hidden": 32}
START_SLURM = Path(__file__).resolve().parents[1] / "slurm" / "start-slurm.sh"
START_SGE = Path(__file__).resolve().parents[1] / "slurm" / "start-sge.sh"


def _scheduler_for_the_session(script: Path, name: str, running: Callable[[str], bool]) -> Iterator[None]:
    """Start a real single-node scheduler with ``script`` (installing it the first time) unless it already
    runs; stop it afterwards only if this session started it."""
    status = subprocess.run([str(script), "status"], capture_output=True, text=True, check=False)
    was_running = running(status.stdout)
    if was_running:
        yield
        return
    if os.geteuid() != 0:
        pytest.skip(f"starting the single-node {name} needs root (or start it first: sudo {script} start)")
    started = subprocess.run([str(script), "start"], capture_output=True, text=True, check=False, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"{script} start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    yield
    subprocess.run([str(script), "stop"], capture_output=True, check=False, timeout=300)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """A real single-node Slurm with accounting (slurm/start-slurm.sh)."""
    yield from _scheduler_for_the_session(START_SLURM, "Slurm", lambda status: "slurmctld: running" in status)


@pytest.fixture(scope="session")
def sge_cluster() -> Iterator[None]:
    """A real single-node Grid Engine: qsub, qstat, qacct (slurm/start-sge.sh)."""
    yield from _scheduler_for_the_session(START_SGE, "Grid Engine", lambda status: status.startswith("qmaster"))


@pytest.fixture(scope="session")
def open_mpi() -> str:
    """mpirun of Debian's openmpi-bin (installed on first use; root), for PBS-style launches."""
    found = shutil.which("mpirun")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("mpirun is missing and installing openmpi-bin needs root: apt-get install openmpi-bin")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openmpi-bin"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return shutil.which("mpirun") or pytest.fail("openmpi-bin installed no mpirun")


@pytest.fixture
def small_checkpoint(tmp_path: Path) -> Path:
    """A small FashionVGG with random (seeded) weights saved as a plain state dict."""
    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save(fashion_vgg(**SMALL_KWARGS).state_dict(), path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """24 small RGBA PNG images (random shapes on transparency) in two subfolders."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(24):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros((40, 32, 4), dtype=np.uint8)
        y, x = rng.integers(0, 20, 2)
        pixels[y:y + 15, x:x + 10] = (*rng.integers(50, 255, 3), 255)
        Image.fromarray(pixels, "RGBA").save(folder / f"img_{i}.png")
    return root
