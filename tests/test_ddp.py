"""Real two-process DistributedDataParallel retraining on CPU (gloo over 127.0.0.1) over real shards.

No part of torch.distributed, webdataset or the filesystem is mocked: two processes are started, join a
process group, stream their own shards and train; they write what they saw and their parameters to files
that the test compares.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from hpcq.artifact import load_artifact
from hpcq.config import config_to_dict
from hpcq.distill import retrain
from hpcq.distributed import DistEnv, distributed_context
from hpcq.models import load_model
from hpcq.quantize import apply_quantized_
from tests.test_distill import make_run_dir, shard_epochs, small_config

WORLD_SIZE = 2
TIMEOUT_S = 240
# 2 epochs of 4 batches of 8 images per rank; the interrupted run stops after step 5 (epoch 1, batch 1)
# with checkpoints every 3 steps and at the end of each epoch.
EPOCHS, BATCHES, BATCH_SIZE, STOP_AT = 2, 4, 8, 5

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _image_hashes(batch: torch.Tensor) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch]


def _worker(rank: int, port: int, work: str, urls: list[str]) -> None:
    """One rank: an uninterrupted run, then a run stopped at STOP_AT and a run that resumes it."""
    torch.set_num_threads(1)
    # A spawned child inherits "spawn" as its start method, so its DataLoader workers would re-import
    # everything (seconds per epoch); processes started by torchrun, srun or mpirun fork their workers.
    mp.set_start_method("fork", force=True)
    work_dir = Path(work)
    env = DistEnv(rank, WORLD_SIZE, rank, "127.0.0.1", port, "torchrun")
    config = small_config(epochs=EPOCHS, batches_per_epoch=BATCHES, batch_size=BATCH_SIZE, checkpoint_every_steps=3,
                          num_workers=1)
    out = {}
    with distributed_context(env, backend="gloo", device="cpu", timeout_s=TIMEOUT_S) as device:
        for label, checkpoints, max_steps in (("full", "full", None), ("stopped", "split", STOP_AT),
                                              ("resumed", "split", None)):
            loaded = load_artifact(work_dir / "run" / "quantized.hpcq")
            student = loaded.model
            apply_quantized_(student, loaded.quantized)
            teacher = load_model(loaded.header["model_source"])
            epochs = shard_epochs(urls, config, rank=rank, world_size=WORLD_SIZE, seed=3)
            seen: list[str] = []

            def batches(epoch, epochs=epochs, seen=seen):
                for batch in epochs(epoch):
                    seen.extend(_image_hashes(batch))
                    yield batch

            result = retrain(student, teacher, batches, config=config, env=env, device=device,
                             checkpoint_dir=work_dir / checkpoints, quantized=loaded.quantized, progress=False,
                             seed=11, max_steps=max_steps)
            out[label] = {"seen": seen, "result": result.to_dict(),
                          "state": {k: v.clone() for k, v in student.state_dict().items()}}
    torch.save(out, work_dir / f"rank{rank}.pt")


def _spawn(work: Path, urls: list[str]) -> list[dict]:
    port = free_port()
    context = mp.start_processes(_worker, args=(port, str(work), urls), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} DDP processes did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return [torch.load(work / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_two_process_ddp_disjoint_data_identical_parameters_and_exact_resume(tmp_path):
    config, run_dir = make_run_dir(tmp_path)
    from hpcq.pipeline import ensure_unlabelled_shards

    urls = ensure_unlabelled_shards(config)[:-1]  # 7 training shards: rank 0 reads 4, rank 1 reads 3
    ranks = _spawn(tmp_path, urls)

    full = [r["full"] for r in ranks]
    # The ranks consume disjoint images, as many as they should.
    images_per_rank = EPOCHS * BATCHES * BATCH_SIZE
    assert [len(r["seen"]) for r in full] == [images_per_rank] * WORLD_SIZE
    assert not set(full[0]["seen"]) & set(full[1]["seen"])
    # DDP keeps the replicas identical, bit for bit.
    for name, tensor in full[0]["state"].items():
        assert torch.equal(tensor, full[1]["state"][name]), name
    # ... and they trained: the last layer moved away from the quantized model's.
    start = load_artifact(run_dir / "quantized.hpcq").model.state_dict()
    assert not torch.equal(full[0]["state"]["classifier.7.weight"], start["classifier.7.weight"])
    for name, qt in load_artifact(run_dir / "quantized.hpcq").quantized.items():
        assert torch.equal(full[0]["state"][name], qt.dequantize()), name
    # Global counters and the all-reduced loss agree across ranks.
    assert full[0]["result"] == {**full[1]["result"], "seconds": full[0]["result"]["seconds"],
                                 "images_per_second": full[0]["result"]["images_per_second"]}
    assert full[0]["result"]["images_seen"] == WORLD_SIZE * images_per_rank
    assert full[0]["result"]["steps"] == EPOCHS * BATCHES

    # Stopped in the middle of epoch 1, resumed from the checkpoint: the same parameters as without the stop.
    for rank in ranks:
        assert rank["stopped"]["result"]["steps"] == STOP_AT
        resumed = rank["resumed"]["result"]
        assert resumed["resumed_from_step"] == STOP_AT and resumed["steps"] == EPOCHS * BATCHES
        assert resumed["images_seen"] == WORLD_SIZE * images_per_rank
        assert resumed["final_loss"] == pytest.approx(full[0]["result"]["final_loss"], rel=1e-12)
        for name, tensor in full[0]["state"].items():
            assert torch.equal(tensor, rank["resumed"]["state"][name]), name
    # The resumed run read the same images in the same order on each rank (skipped ones included).
    for rank in ranks:
        stopped_then_resumed = rank["stopped"]["seen"][: BATCHES * BATCH_SIZE] + rank["resumed"]["seen"]
        assert stopped_then_resumed == rank["full"]["seen"]


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "PBS_", "OMPI_", "PMI_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def quantized_run_with_spec(tmp_path: Path):
    """A run directory up to quantized.hpcq, and its spec written as YAML."""
    config, run_dir = make_run_dir(tmp_path, num_workers=0)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(config_to_dict(config)))
    return config, run_dir, spec


def assert_two_ranks_retrained(config, run_dir: Path, launcher: str) -> None:
    summary = yaml.safe_load((run_dir / "retrain-label_free.json").read_text())
    assert summary["world_size"] == WORLD_SIZE and summary["launcher"] == launcher
    assert summary["images_seen"] == WORLD_SIZE * config.retrain.batches_per_epoch * config.retrain.batch_size
    assert load_artifact(run_dir / "label_free.hpcq").header["extra"]["retrain"]["world_size"] == WORLD_SIZE


def test_torchrun_two_processes_run_the_stage(tmp_path):
    config, run_dir, spec = quantized_run_with_spec(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "-m", "hpcq.retrain_job", str(spec), "--no-progress"]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]

    assert_two_ranks_retrained(config, run_dir, "torchrun")
    assert "rank1" in done.stderr  # both ranks logged


def test_the_entry_point_exits_2_with_the_message_on_a_config_error(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "retrain": {"epochz": 1}}))
    done = subprocess.run([sys.executable, "-m", "hpcq.retrain_job", str(spec)], env=_child_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "unknown key 'retrain.epochz'" in done.stderr and "Did you mean 'epochs'" in done.stderr
    done = subprocess.run([sys.executable, "-m", "hpcq.retrain_job", "--set", f"run_dir={tmp_path / 'none'}"],
                          env=_child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "quantize first" in done.stderr


@pytest.mark.slurm
def test_slurm_job_with_two_tasks_runs_the_stage_under_srun(tmp_path, slurm_cluster):
    # A real batch job: sbatch allocates 2 tasks, srun starts one retraining process per task, and the
    # ranks, world size and rendezvous come from Slurm's variables alone.
    config, run_dir, spec = quantized_run_with_spec(tmp_path)
    log = tmp_path / "slurm-%j.out"
    command = ["sbatch", "--parsable", "--wait", "--job-name=hpcq-retrain", "--partition=debug",
               f"--ntasks={WORLD_SIZE}", "--cpus-per-task=1", "--time=10", f"--output={log}",
               f"--chdir={Path(__file__).resolve().parents[1]}",
               "--wrap", f"srun {sys.executable} -m hpcq.retrain_job {spec} --no-progress"]
    done = subprocess.run(command, env=_child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    job_id = done.stdout.strip().split(";")[0]
    output = Path(str(log).replace("%j", job_id)).read_text() if job_id else ""
    assert done.returncode == 0, done.stderr[-2000:] + output[-3000:]

    assert_two_ranks_retrained(config, run_dir, "slurm")
    assert "rank1" in output  # both ranks logged into the job's output


@pytest.mark.mpi
def test_pbs_retrain_script_under_mpirun_as_pbs_runs_it(tmp_path, open_mpi):
    # No PBS server installs here: the script runs as PBS runs it (PBS_NODEFILE listing the host once per
    # process, PBS_JOBID, PBS_O_WORKDIR), and a real mpirun starts the ranks, which take their places from
    # Open MPI's variables and the node file alone.
    config, run_dir, spec = quantized_run_with_spec(tmp_path)
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\n" * WORLD_SIZE)
    root = Path(__file__).resolve().parents[1]
    env = {**_child_env(), "PBS_NODEFILE": str(nodefile), "PBS_JOBID": "4242.pbs01", "PBS_O_WORKDIR": str(root),
           "SPEC": str(spec), "PYTHON": sys.executable,
           "MPIRUN_ARGS": "--allow-run-as-root --oversubscribe --mca btl self,tcp --mca btl_tcp_if_include lo"}
    done = subprocess.run(["sh", str(root / "slurm" / "retrain.pbs")], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_two_ranks_retrained(config, run_dir, "pbs")
    assert "rank1" in done.stdout + done.stderr
