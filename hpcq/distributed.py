"""Where this process sits in a (possibly) distributed job, and process-group setup and teardown.

``detect_env`` reads the launcher's environment variables into a :class:`DistEnv` value, in this order:

1. torchrun (or any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
   ``MASTER_PORT``, e.g. ``torch.multiprocessing`` tests);
2. Slurm ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is the first host of
   ``SLURM_JOB_NODELIST``, the port is derived from ``SLURM_JOB_ID``);
3. PBS Professional with ``mpirun`` as on ABCI (``PBS_NODEFILE`` plus Open MPI's ``OMPI_COMM_WORLD_*`` or
   MPICH / Intel MPI's ``PMI_RANK`` / ``PMI_SIZE``; the master is the first line of the node file);
4. otherwise a single process.

``MASTER_ADDR`` / ``MASTER_PORT`` in the environment override the derived master under Slurm and PBS.
Nothing here is global state: the value is passed to whoever needs the rank.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from hpcq.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Launcher = Literal["torchrun", "slurm", "pbs", "single"]

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500
# Ports derived from a job id fall in [PORT_BASE, PORT_BASE + PORT_SPAN): above the well-known and
# registered ranges most daemons use, below the usual Linux ephemeral range (32768-60999).
PORT_BASE = 12000
PORT_SPAN = 20000
SCONTROL_TIMEOUT_S = 30


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: global rank, number of processes, rank on its node, rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    launcher: Launcher = "single"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {self.world_size} ({self.launcher})")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(
                f"rank {self.rank} is outside 0..{self.world_size - 1} for world size {self.world_size} "
                f"({self.launcher}); the launcher's variables contradict each other"
            )
        if not 0 <= self.local_rank < self.world_size:
            raise ConfigError(
                f"local rank {self.local_rank} is outside 0..{self.world_size - 1} ({self.launcher}); the "
                "launcher's variables contradict each other"
            )
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"master port {self.master_port} is not a TCP port (1..65535)")
        if not self.master_addr:
            raise ConfigError(f"the master address is empty ({self.launcher})")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Read torchrun's, Slurm's or PBS/MPI's variables (in that order) into a DistEnv; else one process.

    Raises:
        ConfigError: a variable is not an integer, one is missing that the others imply, or the values
            contradict each other (e.g. a rank >= the world size).
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _torchrun(environ)
    if "SLURM_PROCID" in environ:
        return _slurm(environ)
    if "PBS_NODEFILE" in environ:
        return _pbs(environ)
    mpi = [name for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE") if name in environ]
    if mpi and _int(environ, mpi[0]) > 1:
        raise ConfigError(
            f"{mpi[0]}={environ[mpi[0]]} says this is one of several MPI processes, but there is no PBS job "
            "(PBS_NODEFILE) or torchrun variables to find the master: start the job with torchrun, srun, "
            "or mpirun inside a PBS job"
        )
    return DistEnv()


def _int(environ: Mapping[str, str], name: str) -> int:
    text = environ[name]
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} must be an integer") from None


def _master(environ: Mapping[str, str], addr: str, port: int) -> tuple[str, int]:
    """MASTER_ADDR / MASTER_PORT from the environment override the derived ones."""
    addr = environ.get("MASTER_ADDR") or addr
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else port
    return addr, port


def _port_from_job_id(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id.split(".")[0])
    return PORT_BASE + (int(digits) % PORT_SPAN if digits else 0)


def _torchrun(environ: Mapping[str, str]) -> DistEnv:
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
    if missing == ["RANK"] and _int(environ, "WORLD_SIZE") == 1:  # some tools export WORLD_SIZE=1 alone
        return DistEnv(launcher="single")
    if missing:
        present = "RANK" if "RANK" in environ else "WORLD_SIZE"
        raise ConfigError(f"{present} is set but {missing[0]} is not: set both (torchrun sets both) or neither")
    world_size = _int(environ, "WORLD_SIZE")
    rank = _int(environ, "RANK")
    local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    if world_size > 1:
        absent = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(name)]
        if absent:
            raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(absent)} not set: start the job with "
                              "torchrun, which sets them")
    addr, port = _master(environ, DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT)
    return DistEnv(rank, world_size, local_rank, addr, port, "torchrun")


def _slurm(environ: Mapping[str, str]) -> DistEnv:
    rank = _int(environ, "SLURM_PROCID")
    # srun sets SLURM_STEP_NUM_TASKS for the step it starts; SLURM_NTASKS is the allocation's.
    size_name = next((n for n in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if n in environ), None)
    if size_name is None:
        raise ConfigError("SLURM_PROCID is set but SLURM_NTASKS is not: start the job with srun inside sbatch")
    world_size = _int(environ, size_name)
    local_rank = _int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    addr, port = DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT
    if world_size > 1:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError(f"{size_name}={world_size} but SLURM_JOB_NODELIST is not set: start the job with "
                              "srun inside an sbatch allocation")
        addr = first_slurm_host(nodelist)
        port = _port_from_job_id(environ.get("SLURM_JOB_ID", ""))
    addr, port = _master(environ, addr, port)
    return DistEnv(rank, world_size, local_rank, addr, port, "slurm")


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as ``gpu[03-05,9],cpu1``: via ``scontrol show hostnames``
    when scontrol is installed, else by expanding the first entry here."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=SCONTROL_TIMEOUT_S).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("scontrol show hostnames %s failed (%s); expanding the node list here", nodelist, exc)
    return _first_host_plain(nodelist)


def _first_host_plain(nodelist: str) -> str:
    """Expand only the first host of a node list: ``a[01-03,7]-b[2-3],c`` -> ``a01-b2``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"cannot read the first host of the Slurm node list {nodelist!r}; set MASTER_ADDR")
    return host


def _pbs(environ: Mapping[str, str]) -> DistEnv:
    nodefile = Path(environ["PBS_NODEFILE"])
    try:
        lines = [line.strip() for line in nodefile.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"PBS_NODEFILE={nodefile} cannot be read: {exc}") from exc
    if not lines:
        raise ConfigError(f"PBS_NODEFILE={nodefile} lists no host")
    hosts = list(dict.fromkeys(lines))
    if "OMPI_COMM_WORLD_RANK" in environ or "OMPI_COMM_WORLD_SIZE" in environ:
        rank_name, size_name, local_names = "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", (
            "OMPI_COMM_WORLD_LOCAL_RANK",)
    elif "PMI_RANK" in environ or "PMI_SIZE" in environ:
        rank_name, size_name, local_names = "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")
    else:  # the job script itself: one process
        addr, port = _master(environ, hosts[0], _port_from_job_id(environ.get("PBS_JOBID", "")))
        return DistEnv(0, 1, 0, addr, port, "pbs")
    missing = [name for name in (rank_name, size_name) if name not in environ]
    if missing:
        raise ConfigError(f"{missing[0]} is not set although the other MPI rank variable is: start the job with "
                          "mpirun")
    rank, world_size = _int(environ, rank_name), _int(environ, size_name)
    local_name = next((name for name in local_names if name in environ), None)
    if local_name is not None:
        local_rank = _int(environ, local_name)
    elif world_size % len(hosts) == 0:  # mpirun's default mapping fills each node in turn
        local_rank = rank % (world_size // len(hosts))
    else:
        raise ConfigError(f"{world_size} MPI processes on {len(hosts)} hosts and no local rank variable "
                          f"({' or '.join(local_names)}): use the same number of processes on every host")
    addr, port = _master(environ, hosts[0], _port_from_job_id(environ.get("PBS_JOBID", "")))
    return DistEnv(rank, world_size, local_rank, addr, port, "pbs")


@contextmanager
def distributed_context(
    env: DistEnv,
    backend: Literal["auto", "gloo", "nccl"] = "auto",
    device: Literal["auto", "cpu", "cuda"] = "auto",
    timeout_s: float | None = None,
) -> Iterator[torch.device]:
    """Join the job's process group (when ``env.world_size > 1``) and yield this process's device.

    ``backend="auto"`` means NCCL when the process uses a CUDA device, else gloo. With CUDA the device is
    ``cuda:<local_rank>`` and becomes the current device. The process group is destroyed on exit, also
    when the body raises. ``timeout_s`` bounds how long a collective (and the rendezvous) waits for the
    other ranks before failing (torch's default, 10 or 30 minutes, when None).

    Raises:
        ConfigError: NCCL or ``device="cuda"`` without CUDA, an unknown backend, or a local rank without
            its GPU.
    """
    import torch
    import torch.distributed as dist

    if backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"backend {backend!r} is not one of auto, gloo, nccl")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of auto, cpu, cuda")
    cuda = torch.cuda.is_available()
    if backend == "nccl" and not cuda:
        raise ConfigError("retrain.backend nccl needs CUDA, which this process does not have: use backend "
                          "gloo or auto")
    if device == "cuda" and not cuda:
        raise ConfigError("device cuda was asked for but CUDA is not available: use device cpu or auto")
    if backend == "nccl" and device == "cpu":
        raise ConfigError("retrain.backend nccl needs a CUDA device, but device is cpu: use backend gloo")
    use_cuda = cuda and device != "cpu"
    if use_cuda:
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise ConfigError(f"local rank {env.local_rank} has no GPU: this node has {count}; start at most "
                              f"{count} processes per node")
        chosen_device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(chosen_device)
    else:
        chosen_device = torch.device("cpu")
    chosen_backend = "nccl" if backend == "nccl" or (backend == "auto" and use_cuda) else "gloo"

    initialized_here = False
    if env.world_size > 1:
        if dist.is_initialized():
            raise ConfigError("a torch.distributed process group is already initialized in this process; "
                              "call distributed_context only once per process")
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        log.info("rank %d/%d (local %d, %s) joins %s://%s:%d on %s", env.rank, env.world_size, env.local_rank,
                 env.launcher, chosen_backend, env.master_addr, env.master_port, chosen_device)
        dist.init_process_group(chosen_backend, init_method=f"tcp://{host}:{env.master_port}", rank=env.rank,
                                world_size=env.world_size,
                                timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
                                device_id=chosen_device if chosen_backend == "nccl" else None)
        initialized_here = True
    try:
        yield chosen_device
    finally:
        if initialized_here and dist.is_initialized():
            # A DistributedDataParallel wrapper that is garbage by now may still sit in a reference cycle
            # holding the process group; left to the collector at interpreter exit, gloo's worker threads
            # are torn down during finalization and the process aborts ("terminate called without an
            # active exception", seen under srun and mpirun). Collect it while everything is alive.
            gc.collect()
            dist.destroy_process_group()
