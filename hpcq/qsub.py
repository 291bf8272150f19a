"""Sweep arrays through qsub: PBS Professional (ABCI 3.0) and Grid Engine (earlier ABCI systems).

submitit has no executor for either, so hpcq writes the array job itself: a task list
(``tasks.json``) and a POSIX shell script whose element i runs ``python -m hpcq.qsub tasks.json i``,
i.e. one :class:`hpcq.sweep.SweepTask`. The script is submitted with ``qsub``; the driver then waits
until the scheduler no longer knows the job, showing the results as they arrive. An element that ended
without writing a result (killed, out of memory, past its walltime) is recorded as failed, with the path
of its log, and is retried by the next run, like any failed task.

Resources: by default one chunk of ``sweep.cpus_per_task`` CPUs, ``sweep.mem_gb`` and
``sweep.gpus_per_task`` GPUs per element and a walltime of ``sweep.timeout_min`` (PBS:
``-l select=1:ncpus=..:mem=..gb[:ngpus=..]``; Grid Engine: ``-pe smp N`` and ``-l h_rt``);
``sweep.qsub_resources`` replaces the resource request with a site's own (e.g. ABCI's resource types),
``sweep.qsub_queue`` and ``sweep.qsub_project`` give ``-q`` and ``-P``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from hpcq.config import SweepConfig
from hpcq.errors import ConfigError, HpcqError
from hpcq.fileio import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DIALECTS = ("pbs", "sge")
POLL_SECONDS = 2.0
JOB_NAME = "hpcq-sweep"


@dataclass(frozen=True)
class ArrayJob:
    """An array job written to disk: its script, its task list and its number of elements."""

    script: Path
    tasks_file: Path
    count: int
    dialect: str


def _walltime(timeout_min: int) -> str:
    return f"{timeout_min // 60:02d}:{timeout_min % 60:02d}:00"


def directives(config: SweepConfig, dialect: str, count: int, log_dir: Path) -> list[str]:
    """The scheduler directives of the array script (``#PBS`` or ``#$`` lines)."""
    mem_gb = max(1, round(config.mem_gb))
    if dialect == "pbs":
        resources = config.qsub_resources or (
            f"select=1:ncpus={config.cpus_per_task}:mem={mem_gb}gb"
            + (f":ngpus={config.gpus_per_task}" if config.gpus_per_task else "")
        )
        lines = [f"-N {JOB_NAME}", f"-l {resources}", f"-l walltime={_walltime(config.timeout_min)}",
                 "-j oe", f"-o {log_dir}/"]
        if count > 1:  # PBS refuses an array of one element
            lines.append(f"-J 0-{count - 1}")
        prefix = "#PBS"
    elif dialect == "sge":
        resources = config.qsub_resources or f"h_rt={_walltime(config.timeout_min)}"
        lines = ["-S /bin/sh", f"-N {JOB_NAME}", f"-l {resources}", "-j y", f"-o {log_dir}/"]
        if not config.qsub_resources and config.cpus_per_task > 1:
            lines.append(f"-pe smp {config.cpus_per_task}")
        if count > 1:
            lines.append(f"-t 1-{count}")
        prefix = "#$"
    else:
        raise ConfigError(f"qsub dialect {dialect!r} is not one of {DIALECTS}")
    if config.qsub_queue:
        lines.append(f"-q {config.qsub_queue}")
    if config.qsub_project:
        lines.append(f"-P {config.qsub_project}")
    return [f"{prefix} {line}" for line in lines]


def array_script(config: SweepConfig, dialect: str, count: int, tasks_file: Path, log_dir: Path,
                 python: str = sys.executable) -> str:
    """The array job script: directives, then element i runs task i of ``tasks_file``."""
    # PBS numbers elements from 0 (-J 0-N); Grid Engine from 1 (-t 1-N), and says "undefined" outside an
    # array; a job of one element has no index at all.
    index = {
        "pbs": 'index="${PBS_ARRAY_INDEX:-0}"',
        "sge": 'case "${SGE_TASK_ID:-undefined}" in undefined) index=0 ;; *) index=$((SGE_TASK_ID - 1)) ;; esac',
    }[dialect]
    return "\n".join([
        "#!/bin/sh",
        *directives(config, dialect, count, log_dir),
        f"# hpcq sweep: {count} task(s) listed in {tasks_file}",
        "set -eu",
        index,
        f"cd {shlex.quote(str(Path.cwd()))}",
        f'OMP_NUM_THREADS={config.cpus_per_task} exec {shlex.quote(python)} -m hpcq.qsub '
        f'{shlex.quote(str(tasks_file))} "$index"',
        "",
    ])


def write_array_job(config: SweepConfig, specs: Sequence, folder: Path, dialect: str) -> ArrayJob:
    """Write the task list and the array script under ``folder`` (atomically) and return them."""
    folder.mkdir(parents=True, exist_ok=True)
    log_dir = folder / "logs"
    log_dir.mkdir(exist_ok=True)
    tasks_file = folder / "tasks.json"
    atomic_write_json(tasks_file, [asdict(spec) for spec in specs])
    script = folder / f"sweep-{dialect}.sh"
    atomic_write_text(script, array_script(config, dialect, len(specs), tasks_file, log_dir))
    script.chmod(0o755)
    return ArrayJob(script, tasks_file, len(specs), dialect)


def submit(job: ArrayJob) -> str:
    """``qsub`` the script; the job id (PBS: ``1234[].server``; Grid Engine: ``1234``)."""
    command = ["qsub", str(job.script)] if job.dialect == "pbs" else ["qsub", "-terse", str(job.script)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise HpcqError(f"sweep.executor {job.dialect} needs the qsub command, which is not on PATH") from None
    if done.returncode != 0:
        raise HpcqError(f"qsub refused the sweep array ({' '.join(command)}): {done.stderr.strip() or done.stdout}")
    job_id = done.stdout.strip().splitlines()[-1]
    # Grid Engine's -terse prints "1234.1-8:1" for an array.
    return job_id.split(".")[0] if job.dialect == "sge" else job_id


def is_known(job_id: str, dialect: str) -> bool:
    """Whether the scheduler still lists the job (queued, running or finishing)."""
    command = ["qstat", job_id] if dialect == "pbs" else ["qstat", "-j", job_id]
    return subprocess.run(command, capture_output=True, text=True, check=False).returncode == 0


def run_array(config: SweepConfig, specs: Sequence, folder: Path, progress: bool = True) -> None:
    """Run the sweep tasks as one qsub array job and wait for it; elements without a result are recorded
    as failed (with their log folder)."""
    from hpcq.sweep import read_result, record_failure

    job = write_array_job(config, specs, folder, config.executor)
    job_id = submit(job)
    log.info("sweep: submitted %d task(s) as %s array job %s (%s)", job.count, job.dialect, job_id, job.script)
    bar = tqdm(total=job.count, desc="sweep", unit="task", disable=not progress)
    try:
        while is_known(job_id, job.dialect):
            bar.n = sum(read_result(spec) is not None for spec in specs)
            bar.refresh()
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        subprocess.run(["qdel", job_id], capture_output=True, check=False)
        raise
    finally:
        bar.close()
    for spec in specs:
        if read_result(spec) is None:
            record_failure(spec, f"{job.dialect} array job {job_id} ended without a result for this task; "
                                 f"see its log under {folder / 'logs'}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hpcq.qsub TASKS_JSON INDEX``: run one task of an array job (what element INDEX does)."""
    from hpcq.sweep import SweepTask, SweepTaskSpec

    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 2 or not args[1].isdigit():
        log.error("usage: python -m hpcq.qsub TASKS_JSON INDEX")
        return 2
    try:
        tasks = json.loads(Path(args[0]).read_text())
    except (OSError, ValueError) as exc:
        log.error("cannot read the task list %s: %s", args[0], exc)
        return 2
    index = int(args[1])
    if index >= len(tasks):
        log.error("task %d does not exist: %s lists %d", index, args[0], len(tasks))
        return 2
    log.info("task %d of %d on %s", index, len(tasks), os.uname().nodename)
    result = SweepTask(SweepTaskSpec(**tasks[index]))()
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
