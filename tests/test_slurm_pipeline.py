"""The Slurm job scripts of slurm/ run the whole pipeline on a real single-node Slurm: quantize (with the
sweep as a job array submitted from inside that job), label-free retraining as a 2-task srun DDP job, and
the report, chained by slurm/submit-pipeline.sh with afterok dependencies."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import requires_fashion
from .test_cli import write_spec

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "slurm" / "submit-pipeline.sh"
WAIT_S = 900


def wait_for_jobs(job_ids: list[str]) -> dict[str, str]:
    """Poll until none of the jobs is queued or running, then return each one's final accounting state."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)],
                                capture_output=True, text=True, check=False).stdout.split()
        if not set(queued) & set(job_ids):
            break
        time.sleep(2)
    else:
        pytest.fail(f"jobs {job_ids} still queued or running after {WAIT_S} s")
    states: dict[str, str] = {}
    for _ in range(30):  # accounting lags the jobs' ends a little
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(job_ids), "-o", "JobID,State"],
                             capture_output=True, text=True, check=True).stdout
        states = dict(line.split("|")[:2] for line in out.splitlines() if line)
        if all(states.get(job_id, "").split()[:1] not in ([], ["RUNNING"], ["PENDING"]) for job_id in job_ids):
            break
        time.sleep(1)
    return states


def submit_pipeline(tmp_path: Path, checkpoint: Path, image_folder: Path, shard_size: int) -> list[str]:
    """Submit the pipeline for a small spec (sweep as a Slurm array, 2-task retraining); the job ids."""
    spec = write_spec(
        tmp_path, checkpoint, image_folder,
        select={"plan": "auto", "max_accuracy_drop": 100.0},
        sweep={"executor": "slurm", "ks": [4], "layers": "5-6", "eval_images": 500, "fidelity_images": 8,
               "max_parallel": 2, "timeout_min": 5, "mem_gb": 1.0, "slurm_partition": "debug"},
        retrain={"labelled_baseline": False},
        data={"shard_size": shard_size},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(
        HPCQ=str(Path(sys.executable).with_name("hpcq")),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        HPCQ_SBATCH_ARGS=f"--partition=debug --chdir={tmp_path} --output={tmp_path}/%x-%j.out --time=15",
        HPCQ_QUANTIZE_ARGS="--cpus-per-task=1",
        HPCQ_RETRAIN_ARGS="--nodes=1 --ntasks-per-node=2 --cpus-per-task=1",
        HPCQ_REPORT_ARGS="--cpus-per-task=1",
    )
    submitted = subprocess.run([str(SUBMIT), str(spec)], env=env, capture_output=True, text=True, check=False)
    assert submitted.returncode == 0, submitted.stderr
    job_ids = submitted.stdout.split()
    assert len(job_ids) == 3  # quantize, retrain, report
    return job_ids


@requires_fashion
@pytest.mark.slurm
def test_submit_pipeline_runs_every_stage_as_slurm_jobs(tmp_path, small_checkpoint, image_folder, slurm_cluster):
    job_ids = submit_pipeline(tmp_path, small_checkpoint, image_folder, shard_size=4)  # 2 held out, 4 to train
    states = wait_for_jobs(job_ids)  # a failed step cancels the ones after it, so this ends
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(tmp_path.glob("hpcq-*.out")))
    assert all(states.get(job_id) == "COMPLETED" for job_id in job_ids), f"{states}\n{logs}"

    run = tmp_path / "run"
    sweep_results = [json.loads(p.read_text()) for p in (run / "sweep" / "tasks").glob("*.json")]
    assert len(sweep_results) == 2 and all(r["status"] == "ok" for r in sweep_results)
    array_ids = {r["ran_on"]["scheduler_job_id"].split("_")[0] for r in sweep_results}
    assert len(array_ids) == 1 and array_ids.isdisjoint(job_ids)  # an array of its own, from inside the job
    retrain = json.loads((run / "retrain-label_free.json").read_text())
    assert retrain["world_size"] == 2 and retrain["launcher"] == "slurm"
    report = json.loads((run / "report.json").read_text())
    assert report["accuracy"]["label_free"] is not None and report["plan"]["weights"]


@requires_fashion
@pytest.mark.slurm
def test_a_failed_step_cancels_the_rest_and_keeps_what_was_done(tmp_path, small_checkpoint, image_folder,
                                                                slurm_cluster):
    # 24 images in shards of 8: 3 shards, 2 held out, 1 left to train on, too few for 2 ranks.
    quantize, retrain, report = submit_pipeline(tmp_path, small_checkpoint, image_folder, shard_size=8)
    states = wait_for_jobs([quantize, retrain, report])
    assert states[quantize] == "COMPLETED" and states[retrain] == "FAILED"
    assert states[report].startswith("CANCELLED")
    assert "at least 2 are needed" in next(tmp_path.glob(f"hpcq-retrain-{retrain}.out")).read_text()
    assert (tmp_path / "run" / "quantized.hpcq").is_file()  # the quantize step's work stays


def test_submit_pipeline_refuses_a_missing_or_invalid_spec_before_submitting(tmp_path):
    done = subprocess.run([str(SUBMIT), str(tmp_path / "none.yaml")], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "no run spec" in done.stderr
    done = subprocess.run([str(SUBMIT)], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "usage" in done.stderr
    spec = tmp_path / "bad.yaml"
    spec.write_text("retrain: {epochz: 1}\n")
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["/bin/bash", str(SUBMIT), str(spec)], env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2 and "invalid run spec" in done.stderr and "retrain.epochz" in done.stderr
    assert done.stdout == ""  # no job id: nothing was submitted
    spec.write_text("retrain: {epochs: 1}\n")
    done = subprocess.run(["/bin/bash", str(SUBMIT), str(spec), "--set", "retrain.epochs=0"], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "retrain.epochs must be > 0" in done.stderr
