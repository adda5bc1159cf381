"""Who am I in the job: rank discovery (launcher variables, else MPI, else one process) and process-group set-up.

torchrun, DeepSpeed's `deepspeed` launcher (and torch.distributed.launch,
SLURM wrappers that mimic them) export RANK / WORLD_SIZE / LOCAL_RANK
(source "env"). Under mpirun / srun --mpi those are absent;
when an MPI launcher's variables are present (or DIST8BIT_USE_MPI=1) and
mpi4py is importable, the ranks come from MPI.COMM_WORLD and MASTER_ADDR /
MASTER_PORT default to rank 0's host name and 29500, so that torch's env://
rendezvous works unchanged. mpi4py is only imported in that case: importing
it initialises MPI, which a plain `python launch/pretrain.py` should not pay for.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT = "29500"
# Variables that MPI launchers export to each process (Open MPI, MPICH/Hydra and Intel MPI, PMIx, MVAPICH).
MPI_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str  # "env" (torchrun, deepspeed, ...), "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _from_launcher_env() -> DistEnv | None:
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    world_size = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", rank)
    local_world_size = _int_env("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return DistEnv(rank, world_size, local_rank, local_world_size, "env")


def _mpi_requested() -> bool:
    return os.environ.get("DIST8BIT_USE_MPI") == "1" or any(v in os.environ for v in MPI_LAUNCHER_VARIABLES)


def _from_mpi() -> DistEnv | None:
    if not _mpi_requested():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    world = MPI.COMM_WORLD
    if world.Get_size() <= 1:
        return None
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    env = DistEnv(world.Get_rank(), world.Get_size(), node.Get_rank(), node.Get_size(), "mpi")
    master_addr = world.bcast(socket.gethostname() if env.rank == 0 else None, root=0)
    os.environ.setdefault("MASTER_ADDR", master_addr)
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    # Export what torchrun would have, so that anything downstream reads one convention.
    for name, value in (
        ("RANK", env.rank),
        ("WORLD_SIZE", env.world_size),
        ("LOCAL_RANK", env.local_rank),
        ("LOCAL_WORLD_SIZE", env.local_world_size),
    ):
        os.environ[name] = str(value)
    return env


def discover() -> DistEnv:
    """This process's place in the job: a launcher's RANK/WORLD_SIZE, else MPI's world, else a single process."""
    return _from_launcher_env() or _from_mpi() or DistEnv(0, 1, 0, 1, "single")


def device_for(env: DistEnv) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def threads_per_rank(env: DistEnv) -> int:
    """An even share of this machine's usable cores among the ranks on it (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, env.local_world_size))


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """nccl on CUDA, gloo on the CPU. A one-process group needs no rendezvous (an in-memory store)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size == 1 and "MASTER_ADDR" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(
            backend, rank=env.rank, world_size=env.world_size, device_id=device if backend == "nccl" else None
        )


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
