"""Batches of a CIFAR split for training and evaluation. Two loaders share one interface (``set_epoch``,
``global_batch_size``, ``__iter__``, ``__len__``):

* :class:`DeviceLoader` keeps a whole split as one uint8 tensor on the device and builds each batch with a
  handful of batched tensor ops (gather, pad-4 random crop, horizontal flip, normalisation).
* :func:`dataloader_loader` is the conventional ``torch.utils.data.DataLoader`` with per-sample
  ``torchvision.transforms.v2`` augmentation in worker processes (the baseline and the ``num_workers`` study).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.data.cifar import PAD, Split


def _epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for (seed, epoch, stream); SeedSequence keeps nearby tuples' streams unrelated."""
    state = np.random.SeedSequence([int(seed), int(epoch), stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _num_batches(n: int, batch_size: int, world_size: int, drop_last: bool) -> int:
    g = batch_size * world_size
    return n // g if drop_last else -(-n // g)


def _rank_bounds(b: int, n: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Positions [lo, hi) of the epoch order that form rank ``rank``'s batch ``b``.

    Global batch b is positions [b*G, b*G + m) with G = batch_size*world_size; rank r takes the r-th of
    world_size contiguous near-equal pieces of it (exactly batch_size each when m == G).
    """
    start = b * batch_size * world_size
    m = min(batch_size * world_size, n - start)
    return start + rank * m // world_size, start + (rank + 1) * m // world_size


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class DeviceLoader:
    """Batches of one split held as a single uint8 tensor on ``device``, augmented in batches.

    Per epoch a permutation (``shuffle``) and, with ``augment``, one crop offset and flip bit per position
    are drawn on the CPU from a generator seeded by (seed, epoch), so batches depend only on (seed, epoch):
    a resumed run sees the same batches as an unbroken one, on any device. Call :meth:`set_epoch` before
    each epoch (iterating twice without it repeats the epoch, as with ``DistributedSampler``).

    Each batch: gather the images, pad-4 random crop and horizontal flip on uint8 (augment only; the split is
    then kept zero-padded on the device, 1.56x its size), then ``x.float() * 1/(255 std) - mean/std``. Yields ``(x, y)``: float32 (B, 3, 32, 32) (channels_last memory
    format if asked) and int64 (B,), both on ``device``.

    Distributed: every rank draws the same order and augmentation; global batch b is the contiguous slice
    [b*G, (b+1)*G) of the epoch order, G = batch_size*world_size, and rank r takes its r-th contiguous
    ``batch_size`` piece. So concatenating the ranks' batch b in rank order gives exactly (pixels included)
    batch b of one process with batch_size*world_size. A last partial global batch (drop_last=False) is
    cut into near-equal pieces, which may be empty on some ranks when fewer images than ranks remain;
    every rank has the same ``len``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_batching(batch_size, rank, world_size)
        if tuple(split.images.shape[1:]) != (3, 32, 32) or split.images.dtype != torch.uint8:
            raise ValueError(
                f"expected uint8 images (N, 3, 32, 32), got {split.images.dtype} {tuple(split.images.shape)}"
            )
        self.device = torch.device(device)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.augment, self.shuffle, self.seed, self.drop_last = augment, shuffle, seed, drop_last
        self.channels_last = channels_last
        self.epoch, self.start_batch = 0, 0
        self._n = len(split)
        self._labels = split.labels.to(self.device, torch.int64)
        images = split.images.to(self.device).contiguous()
        if augment:
            # Padded once so each crop is a plain window: the (N, 9, 9, 3, 32, 32) strided view below holds
            # every crop of every image without copying, and one advanced-indexing op picks a batch's crops.
            self._images = torch.nn.functional.pad(images, (PAD,) * 4)
            s = self._images.stride()
            k = 2 * PAD + 1
            self._windows = self._images.as_strided((self._n, k, k, 3, 32, 32), (s[0], s[2], s[3], s[1], s[2], s[3]))
        else:
            self._images = images
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std_t), -mean_t / std_t
        self._len = _num_batches(self._n, batch_size, world_size, drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses, and the batch it
        starts at (a run resumed mid-epoch skips the batches it already trained on)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def global_batch_size(self, b: int) -> int:
        """Images in global batch ``b`` summed over all ranks (the last one may be short)."""
        g = self.batch_size * self.world_size
        return max(0, min(g, self._n - b * g))

    def __len__(self) -> int:
        return self._len

    def _draws(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        g = _epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self._n, generator=g) if self.shuffle else None
        if not self.augment:
            return (None if order is None else order.to(self.device)), None, None
        if order is None:
            order = torch.arange(self._n)
        offsets = torch.randint(0, 2 * PAD + 1, (2, self._n), generator=g)
        flips = torch.randint(0, 2, (self._n,), generator=g, dtype=torch.uint8)
        return order.to(self.device), offsets.to(self.device), flips.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, offsets, flips = self._draws()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for b in range(self.start_batch, self._len):
            lo, hi = _rank_bounds(b, self._n, self.batch_size, self.rank, self.world_size)
            if order is None:
                x, y = self._images[lo:hi], self._labels[lo:hi]
            else:
                idx = order[lo:hi]
                y = self._labels[idx]
                if offsets is None or flips is None:
                    x = self._images[idx]
                else:
                    x = self._windows[idx, offsets[0, lo:hi], offsets[1, lo:hi]]
                    # Flip on uint8 as x + (flipped - x) * bit: exact in wrap-around uint8 arithmetic and
                    # faster on the CPU than torch.where (bench/loader.py --impls).
                    x = x + (x.flip(3) - x) * flips[lo:hi].view(-1, 1, 1, 1)
            x = x.to(torch.float32, memory_format=fmt).mul_(self._scale).add_(self._shift)
            yield x, y


class _IndexedDataset(torch.utils.data.Dataset):
    """Per-sample (transform(image), label) over a uint8 split."""

    def __init__(self, split: Split, transform):
        self.images, self.labels, self.transform = split.images, split.labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(self.images[i]), self.labels[i]


class _EpochBatchSampler(torch.utils.data.Sampler):
    """The same per-rank batches of indices as DeviceLoader (same order for the same seed and epoch)."""

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool, rank: int, world_size: int
    ):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size, self.epoch = drop_last, rank, world_size, 0
        self.start_batch = 0

    def __len__(self) -> int:
        return _num_batches(self.n, self.batch_size, self.world_size, self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=_epoch_generator(self.seed, self.epoch)).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start_batch, len(self)):
            lo, hi = _rank_bounds(b, self.n, self.batch_size, self.rank, self.world_size)
            yield order[lo:hi]


class TorchLoader:
    """A ``DataLoader`` with per-sample torchvision v2 transforms behind DeviceLoader's interface.

    Batch composition matches DeviceLoader for the same (seed, epoch, rank); augmentation draws differ
    (they come from the DataLoader's worker seeding, itself seeded by (seed, epoch)). With
    ``num_workers=0`` the draws come from a private RNG state so the caller's global RNG is untouched.
    Batches stay on the CPU.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool,
        shuffle: bool,
        seed: int,
        num_workers: int,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        from torchvision.transforms import v2

        _check_batching(batch_size, rank, world_size)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        steps = [v2.RandomCrop(32, padding=PAD), v2.RandomHorizontalFlip()] if augment else []
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
        self.seed, self.num_workers, self.epoch = seed, num_workers, 0
        self.sampler = _EpochBatchSampler(
            len(split), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
        )
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            _IndexedDataset(split, v2.Compose(steps)),
            batch_sampler=self.sampler,
            num_workers=num_workers,
            generator=self.generator,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (order and augmentation seeds) of the next iteration and its first batch.
        A mid-epoch start sees the same images as an unbroken epoch, but other augmentation draws."""
        self.epoch = self.sampler.epoch = int(epoch)
        self.sampler.start_batch = int(start_batch)

    def global_batch_size(self, b: int) -> int:
        g = self.sampler.batch_size * self.sampler.world_size
        return max(0, min(g, self.sampler.n - b * g))

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers' seeds are drawn from self.generator when the iterator starts.
        self.generator.manual_seed(int(_epoch_generator(self.seed, self.epoch, 1).initial_seed()))
        if self.num_workers > 0:
            yield from self.loader
            return
        state = torch.randint(0, 2**62, (), generator=self.generator).item()
        rng = torch.Generator().manual_seed(int(state)).get_state()
        it = iter(self.loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(rng)
                batch = next(it, None)
                rng = torch.get_rng_state()
            if batch is None:
                return
            yield batch


# The conventional path: DataLoader + per-sample torchvision v2 transforms (see :class:`TorchLoader`).
dataloader_loader = TorchLoader
