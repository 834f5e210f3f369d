"""One rank of a two-process gloo data-parallel epoch in which only rank 1 gets a NaN batch.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.ddp_nan_rank BAD CHECK_STEPS

Rank 1's batch ``BAD`` (0-based) is all NaN; rank 0's data is clean. Each rank runs ``train_one_epoch``
of a DDP ResNet-20 over 20 batches of 8 (its shard of 320 images) and prints its EpochResult as one JSON line. Used by
tests/test_training_faults.py: both ranks must stop at the same step (neither waits forever in an
all-reduce the other never joins), each with a divergence record.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.data.loaders import DeviceLoader
from pipeline.data.cifar import Split
from pipeline.models import build_model
from pipeline.stages.distributed import Dist
from pipeline.stages.loop import train_one_epoch


def main() -> None:
    bad, check_steps = int(sys.argv[1]), int(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (320, 3, 32, 32), generator=g, dtype=torch.uint8)
    split = Split(images, torch.arange(320) % 10)  # the same data on both ranks, each its own shard of it
    loader = DeviceLoader(
        split, 8, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.25,) * 3, rank=rank, world_size=world
    )
    loader.set_epoch(0)

    def batches():
        for i, (x, y) in enumerate(loader):
            yield (torch.full_like(x, float("nan")) if rank == 1 and i == bad else x), y

    class Poisoned:
        def __len__(self) -> int:
            return len(loader)

        def __iter__(self):
            return batches()

        def global_batch_size(self, b: int) -> int:  # what train_one_epoch scales each rank's loss by
            return loader.global_batch_size(b)

    torch.manual_seed(0)
    model = DistributedDataParallel(build_model("resnet20", 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    res = train_one_epoch(model, Poisoned(), opt, nan_check_steps=check_steps, dist=Dist(rank, world, rank))
    print(json.dumps({"rank": rank, "steps": res.steps, "diverged": res.diverged, "batches": len(loader)}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
