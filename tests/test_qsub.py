"""qsub array jobs for PBS Professional and Grid Engine: the scripts hpcq writes, and a PBS script run the
way PBS runs it (no PBS server installs on Debian 12; Grid Engine runs for real in test_sweep.py)."""

import json
import os
import subprocess

import pytest

from hpcq.config import SweepConfig, load_config
from hpcq.pipeline import prepare_stage
from hpcq.qsub import array_script, write_array_job
from hpcq.rundir import open_run_dir
from hpcq.sweep import plan_tasks, read_result

from .conftest import requires_fashion
from .test_cli import write_spec
from .test_sweep import three_valued_checkpoint


def directive_lines(script: str, prefix: str) -> list[str]:
    return [line[len(prefix) + 1:] for line in script.splitlines() if line.startswith(prefix + " ")]


def test_pbs_script_asks_for_the_configured_resources(tmp_path):
    config = SweepConfig(executor="pbs", cpus_per_task=4, mem_gb=15.5, gpus_per_task=1, timeout_min=90,
                         qsub_queue="rt_HG", qsub_project="gab50000")
    script = array_script(config, "pbs", 12, tmp_path / "tasks.json", tmp_path / "logs")
    assert directive_lines(script, "#PBS") == [
        "-N hpcq-sweep", "-l select=1:ncpus=4:mem=16gb:ngpus=1", "-l walltime=01:30:00", "-j oe",
        f"-o {tmp_path / 'logs'}/", "-J 0-11", "-q rt_HG", "-P gab50000",
    ]
    assert 'index="${PBS_ARRAY_INDEX:-0}"' in script and "-m hpcq.qsub" in script
    custom = SweepConfig(executor="pbs", qsub_resources="select=1:rt_type=rt_HF")
    single = array_script(custom, "pbs", 1, tmp_path / "tasks.json", tmp_path / "logs")
    assert "-l select=1:rt_type=rt_HF" in directive_lines(single, "#PBS")
    assert not any(line.startswith("-J") for line in directive_lines(single, "#PBS"))  # no array of one


def test_sge_script_uses_grid_engine_syntax(tmp_path):
    config = SweepConfig(executor="sge", cpus_per_task=2, timeout_min=5, qsub_queue="all.q")
    script = array_script(config, "sge", 3, tmp_path / "tasks.json", tmp_path / "logs")
    assert directive_lines(script, "#$") == [
        "-S /bin/sh", "-N hpcq-sweep", "-l h_rt=00:05:00", "-j y", f"-o {tmp_path / 'logs'}/",
        "-pe smp 2", "-t 1-3", "-q all.q",
    ]
    assert "index=$((SGE_TASK_ID - 1))" in script


@requires_fashion
def test_pbs_array_script_run_as_pbs_runs_it(tmp_path, image_folder):
    # PBS runs the script once per element with PBS_ARRAY_INDEX and PBS_JOBID set: so does this test.
    checkpoint = three_valued_checkpoint(tmp_path / "three.pt")
    spec = write_spec(tmp_path, checkpoint, image_folder,
                      sweep={"executor": "pbs", "ks": [2, 8], "layers": "1,6", "eval_images": 200,
                             "fidelity_images": 8})
    config = load_config(spec)
    run = open_run_dir(config)
    prepared = prepare_stage(config, run, progress=False)
    specs = plan_tasks(run.root, prepared.manifest, config.sweep)
    job = write_array_job(config.sweep, specs, run.root / "sweep" / "qsub", "pbs")
    assert job.count == 4 and json.loads(job.tasks_file.read_text())[3]["k"] == 8
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PBS_", "JOB_ID", "SGE_"))}
    codes = []
    for index in range(job.count):
        element = {**env, "PBS_ARRAY_INDEX": str(index), "PBS_JOBID": f"4242[{index}].pbs01"}
        codes.append(subprocess.run(["sh", str(job.script)], env=element, capture_output=True, text=True,
                                    timeout=300, check=False).returncode)
    results = [read_result(s) for s in specs]
    assert [r["status"] for r in results] == ["ok", "failed", "ok", "ok"]  # features.0 has 3 distinct values
    assert codes == [0, 1, 0, 0]  # a failed task fails its element too, so the scheduler shows it
    assert [r["ran_on"]["scheduler_job_id"] for r in results if r["status"] == "ok"] == [
        "4242[0].pbs01", "4242[2].pbs01", "4242[3].pbs01"]
    beyond = subprocess.run(["sh", str(job.script)], env={**env, "PBS_ARRAY_INDEX": "4"}, capture_output=True,
                            text=True, timeout=120, check=False)
    assert beyond.returncode == 2 and "task 4 does not exist" in beyond.stderr


def test_element_runner_usage_errors(tmp_path):
    from hpcq.qsub import main

    assert main([]) == 2
    assert main([str(tmp_path / "missing.json"), "0"]) == 2


def test_qsub_missing_is_a_clear_error(tmp_path, monkeypatch):
    from hpcq.errors import HpcqError
    from hpcq.qsub import submit

    job = write_array_job(SweepConfig(executor="pbs"), [], tmp_path, "pbs")
    monkeypatch.setenv("PATH", str(tmp_path))  # no qsub anywhere
    with pytest.raises(HpcqError, match="needs the qsub command"):
        submit(job)
