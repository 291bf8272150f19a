"""Executors for fan-out stages: submitit's debug (in process), local (subprocesses) and Slurm. PBS and
Grid Engine arrays, which submitit does not know, are in :mod:`hpcq.qsub`.

Site knowledge (partitions, accounts) belongs in the run spec or a site profile under ``jobs/``, never here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hpcq.config import SweepConfig
from hpcq.errors import ConfigError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def make_executor(config: SweepConfig, folder: Path):
    """A submitit executor for ``config.executor``, writing its logs under ``folder``."""
    import submitit

    folder = Path(folder)
    if config.executor == "debug":
        return submitit.DebugExecutor(folder)
    if config.executor == "local":
        executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=config.timeout_min)
        return executor
    if config.executor == "slurm":
        executor = submitit.AutoExecutor(folder, cluster="slurm")
        executor.update_parameters(**slurm_parameters(config))
        return executor
    raise ConfigError(f"sweep.executor {config.executor!r} is not one of debug, local, slurm (pbs and sge run "
                      "through hpcq.qsub)")


def slurm_parameters(config: SweepConfig) -> dict[str, Any]:
    """submitit parameters of the sweep's Slurm job array (one task per array element)."""
    params: dict[str, Any] = {
        "name": "hpcq-sweep",
        "timeout_min": config.timeout_min,
        "cpus_per_task": config.cpus_per_task,
        "mem_gb": config.mem_gb,
        "slurm_array_parallelism": config.max_parallel,
    }
    if config.slurm_partition:
        params["slurm_partition"] = config.slurm_partition
    if config.slurm_account:
        params["slurm_account"] = config.slurm_account
    if config.gpus_per_task:
        params["gpus_per_node"] = config.gpus_per_task
    return params


def run_callables(
    executor,
    callables: Sequence[Callable[[], Any]],
    max_parallel: int,
    on_error: Callable[[int, BaseException], Any],
    desc: str = "tasks",
    progress: bool = True,
) -> list[Any]:
    """Run the callables as jobs, at most ``max_parallel`` at a time, and return their results in order.

    A job that fails (the callable raised, the process died, the scheduler cancelled it) does not stop the
    others: ``on_error(index, exception)`` gives its result instead. Slurm gets the whole list as one job
    array (``slurm_array_parallelism`` throttles it); other executors are fed as slots free up.
    """
    results: list[Any] = [None] * len(callables)
    bar = tqdm(total=len(callables), desc=desc, unit="task", disable=not progress)

    def collect(index: int, job) -> None:
        try:
            results[index] = job.result()
        except Exception as exc:  # noqa: BLE001 - any job failure is recorded, never fatal for the rest
            log.error("%s %d failed: %s", desc, index, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            results[index] = on_error(index, exc)
        bar.update(1)

    if getattr(executor, "cluster", None) == "slurm":
        import submitit

        # Submitted from inside a Slurm job (slurm/quantize.sbatch), sbatch would inherit that job's SLURM_*
        # variables, e.g. a --mem-per-cpu that clashes with the array's --mem.
        with submitit.helpers.clean_env():
            jobs = executor.submit_array(list(callables))
        for index, job in enumerate(jobs):
            collect(index, job)
    else:
        pending = list(enumerate(callables))
        running: list[tuple[int, Any]] = []
        while pending or running:
            while pending and len(running) < max(1, max_parallel):
                index, func = pending.pop(0)
                running.append((index, executor.submit(func)))
            finished = [(i, job) for i, job in running if _done(job)]
            for item in finished:
                running.remove(item)
                collect(*item)
            if running and not finished:
                time.sleep(POLL_SECONDS)
    bar.close()
    return results


def _done(job) -> bool:
    # The debug executor runs a job when asked for its result, so it counts as ready at once.
    return job.__class__.__name__ == "DebugJob" or job.done()
