"""This process's place in a data-parallel job: rank and world size from the environment (exported from
Slurm's inside a multi-task job), the process group, and waiting for the other ranks. Torch-free at
import: the runner reads the rank before any stage imports torch."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.stages.distributed")


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> Dist:
    """Rank and world size from torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK), which
    :func:`export_distributed_env` sets from Slurm's inside a multi-task job."""
    return Dist(
        int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    )


def init_distributed(dist: Dist, device: torch.device) -> None:
    """NCCL between GPUs, gloo between CPU processes; MASTER_ADDR/MASTER_PORT come from the environment."""
    import torch

    if dist.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=dist.rank, world_size=dist.world_size)
        log.info("rank %d of %d joined (%s)", dist.rank, dist.world_size, backend)


def export_distributed_env() -> None:
    """Inside a multi-task Slurm job: set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK from
    Slurm's variables with submitit's helper (also for plain ``srun python -m pipeline.run``)."""
    import submitit

    if "SLURM_JOB_ID" in os.environ:
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def job_rank() -> int:
    """This process's data-parallel rank; in a multi-task Slurm job the torch.distributed variables are
    exported from Slurm's first (:func:`export_distributed_env`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        export_distributed_env()
    return int(os.environ.get("RANK", "0"))


def wait_for_all_ranks() -> None:
    """In a multi-rank job, wait until every rank has finished the stage (rank 0 has written its files)."""
    torch = sys.modules.get("torch")  # imported by the stage when there is one; never imported here
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
