"""CIFAR data: read the on-disk "python version" files, split, and feed batches.

Two loaders share one interface (``set_epoch``, ``__iter__``, ``__len__``):

* :class:`DeviceLoader` keeps a whole split as one uint8 tensor on the device and builds each batch with a
  handful of batched tensor ops (gather, pad-4 random crop, horizontal flip, normalisation).
* :func:`dataloader_loader` is the conventional ``torch.utils.data.DataLoader`` with per-sample
  ``torchvision.transforms.v2`` augmentation in worker processes (the baseline and the ``num_workers`` study).

Also: :func:`write_synthetic` writes a small learnable data set in the real CIFAR file format, and a CLI::

    python -m pipeline.data download cifar10 --root DIR
    python -m pipeline.data synthetic --root DIR [--layout synthetic|cifar10|cifar100] [--classes N] ...
    python -m pipeline.data info NAME --root DIR
"""

from __future__ import annotations

# Kept above the heavy imports so readers of the source find the canonical list first.
DATASETS = ("cifar10", "cifar100", "synthetic")

import argparse
import math
import os
import pickle
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "LAYOUT_FOLDERS",
    "Split",
    "CifarData",
    "load_cifar",
    "read_cifar_pickle",
    "UnsafePickleError",
    "DeviceLoader",
    "TorchLoader",
    "dataloader_loader",
    "write_synthetic",
    "download",
    "main",
]

# Folder under the data root for each data set name (= write_synthetic layout).
LAYOUT_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "synthetic": "synthetic-batches-py"}
_CIFAR10_FILES = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta")
_CIFAR100_FILES = (["train"], ["test"], "meta")
_PIXELS = 3 * 32 * 32
_PAD = 4


def _files_for(name: str) -> tuple[list[str], list[str], str]:
    return _CIFAR100_FILES if name == "cifar100" else _CIFAR10_FILES


def _hint(name: str, root: Path) -> str:
    if name == "synthetic":
        return f"python -m pipeline.data synthetic --root {root}"
    return f"python -m pipeline.data download {name} --root {root}"


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One split: uint8 images (N, 3, 32, 32) NCHW contiguous and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class CifarData:
    """Train/val/test splits plus class names and the train split's per-channel mean/std in [0, 1] units."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _decode(value: object) -> object:
    """bytes -> str (Python-2 pickles store str as bytes); lists of bytes element-wise."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin1")
    if isinstance(value, list) and value and all(isinstance(v, bytes) for v in value):
        return [_decode(v) for v in value]
    return value


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A data file that names a global no CIFAR file contains: unpickling it could run any code."""


def _latin1_encode(text: object, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 uses it for bytes in protocol-2 pickles, latin-1 only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"_codecs.encode called with ({type(text).__name__}, {encoding!r}); only (str, 'latin1') is allowed"
        )
    return text.encode("latin1")


# The only globals real and synthetic CIFAR files refer to: numpy array reconstruction (numpy 1 and 2
# module names; _frombuffer is numpy's protocol-5 path) and, in Python 3 protocol-2 pickles, the bytes of
# the array buffers. Lists, dicts, bytes, str and int need no globals.
_CIFAR_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`_CIFAR_GLOBALS`: a crafted file cannot call
    ``os.system`` or anything else through ``__reduce__``."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _CIFAR_GLOBALS:
            raise UnsafePickleError(
                f"{self.path}: refused to load global '{module}.{name}': CIFAR files only "
                f"contain numpy arrays, lists, dicts, str, bytes and int (allowed globals: "
                f"{', '.join(sorted(f'{m}.{n}' for m, n in _CIFAR_GLOBALS))}); not loading "
                "a file that could run code"
            )
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        return super().find_class(module, name)


def read_cifar_pickle(path: str | Path) -> dict[str, object]:
    """Load one CIFAR pickle; bytes keys (and bytes/list-of-bytes values) are decoded to str.

    ``encoding='bytes'`` reads the real Python-2 files (whose str objects, numpy buffers included, come back
    as bytes) as well as Python-3 pickles with either str or bytes keys. Only the globals of CIFAR files are
    resolved (:class:`UnsafePickleError` otherwise); a damaged file is a ValueError naming it.
    """
    path = Path(path)
    with path.open("rb") as f:
        try:
            obj = _CifarUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            KeyError,
            IndexError,
            AttributeError,
            MemoryError,
        ) as e:
            raise ValueError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {str(_decode(k) if isinstance(k, bytes) else k): _decode(v) for k, v in obj.items()}


@dataclass
class _Raw:
    train_x: np.ndarray  # (N, 3, 32, 32) uint8
    train_y: np.ndarray  # (N,) int64
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]


def _read_batches(paths: Sequence[Path], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for p in paths:
        d = read_cifar_pickle(p)
        if "data" not in d or not ("labels" in d or "fine_labels" in d):
            raise ValueError(f"{p}: not a CIFAR batch (keys {sorted(map(str, d))})")
        x = np.asarray(d["data"])
        y = np.asarray(d["labels"] if "labels" in d else d["fine_labels"], dtype=np.int64)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != _PIXELS or len(y) != len(x):
            raise ValueError(
                f"{p}: expected uint8 data of shape (N, {_PIXELS}) and N labels, "
                f"got {x.dtype} {x.shape} and {len(y)} labels"
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{p}: labels outside [0, {num_classes}) (meta lists {num_classes} classes)")
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs) if xs else np.zeros((0, _PIXELS), np.uint8)
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32)), np.concatenate(ys)


def _read_raw(name: str, root: str | Path) -> _Raw:
    """Every train and test image of data set ``name`` under ``root``, in file order."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    root = Path(root).expanduser()
    folder = root / LAYOUT_FOLDERS[name]
    train_files, test_files, meta_file = _files_for(name)
    missing = [f for f in (*train_files, *test_files, meta_file) if not (folder / f).is_file()]
    if missing:
        what = "folder" if not folder.is_dir() else "files " + ", ".join(missing) + " in"
        raise FileNotFoundError(f"{name}: missing {what} {folder}. Create it with: {_hint(name, root)}")
    meta = read_cifar_pickle(folder / meta_file)
    key = "fine_label_names" if name == "cifar100" else "label_names"
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise ValueError(f"{folder / meta_file}: no {key!r} list")
    names = [str(n) for n in names]
    train_x, train_y = _read_batches([folder / f for f in train_files], len(names))
    test_x, test_y = _read_batches([folder / f for f in test_files], len(names))
    return _Raw(train_x, train_y, test_x, test_y, names)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std in [0, 1] units, from 256-bin histograms."""
    if images.shape[0] == 0:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    v = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        m = (counts * v).sum() / n
        var = (counts * (v - m) ** 2).sum() / n
        means.append(float(m) / 255.0)
        stds.append(max(math.sqrt(float(var)), 1e-6) / 255.0)
    return tuple(means), tuple(stds)


def load_cifar(
    name: str, root: str | Path, *, val_size: int = 5000, split_seed: int = 0, train_size: int = 0
) -> CifarData:
    """Read data set ``name`` from ``root`` and split its train files into train/val.

    A permutation seeded by ``split_seed`` sends its first ``val_size`` images to val and the rest, in
    permuted order, to train; ``train_size > 0`` then keeps the first ``train_size`` of those. The test
    split is the test file(s) in file order. mean/std come from the (final) train split.
    """
    raw = _read_raw(name, root)
    n = len(raw.train_y)
    if val_size < 0 or train_size < 0:
        raise ValueError(f"val_size and train_size must be >= 0, got {val_size} and {train_size}")
    folder = Path(root).expanduser() / LAYOUT_FOLDERS[name]
    if val_size >= n:
        raise ValueError(f"val_size={val_size} must be smaller than the {n} training images in {folder}")
    if train_size > n - val_size:
        raise ValueError(
            f"train_size={train_size} exceeds the {n - val_size} training images left after "
            f"val_size={val_size} in {folder}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_size > 0:
        train_idx = train_idx[:train_size]
    images, labels = torch.from_numpy(raw.train_x), torch.from_numpy(raw.train_y)
    train = Split(images[train_idx].contiguous(), labels[train_idx].contiguous())
    val = Split(images[val_idx].contiguous(), labels[val_idx].contiguous())
    test = Split(torch.from_numpy(raw.test_x), torch.from_numpy(raw.test_y))
    mean, std = _channel_stats(train.images)
    return CifarData(train, val, test, len(raw.class_names), raw.class_names, mean, std)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


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
            self._images = torch.nn.functional.pad(images, (_PAD,) * 4)
            s = self._images.stride()
            k = 2 * _PAD + 1
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
        offsets = torch.randint(0, 2 * _PAD + 1, (2, self._n), generator=g)
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
        steps = [v2.RandomCrop(32, padding=_PAD), v2.RandomHorizontalFlip()] if augment else []
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


def dataloader_loader(
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
) -> TorchLoader:
    """The conventional path: DataLoader + per-sample torchvision v2 transforms (see :class:`TorchLoader`)."""
    return TorchLoader(
        split,
        batch_size,
        mean=mean,
        std=std,
        augment=augment,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
    )


# --------------------------------------------------------------------------------------------------
# Synthetic data in the real file format
# --------------------------------------------------------------------------------------------------


def _upsample(low: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of the last two axes to ``size``; elementwise ops only, so bit-reproducible."""

    def axis_weights(n: int):
        pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        i0 = np.floor(pos).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, pos - i0

    i0, i1, w = axis_weights(low.shape[-2])
    rows = low[..., i0, :] * (1 - w)[:, None] + low[..., i1, :] * w[:, None]
    j0, j1, v = axis_weights(low.shape[-1])
    return rows[..., j0] * (1 - v) + rows[..., j1] * v


def _synthetic_images(num_classes: int, per_class: tuple[int, int], seed: int):
    """(train_x, train_y, test_x, test_y) with images (N, 3072) uint8, shuffled within each part.

    Each class has a smooth random colour pattern on a 40x40 canvas; an image is a random 32x32 window of it
    (shifts of up to +-4 px) with random per-channel gain/offset, plus a smooth random distractor pattern
    and pixel noise, so classes are learnable but overlap.
    """
    rng = np.random.default_rng(seed)
    canvas = 32 + 2 * _PAD
    # Weights tuned so ResNet-20 reaches ~60% test accuracy after 20 SGD steps on 500 images and ~90% after
    # 3 epochs on 2,000 (10 classes).
    protos = _upsample(rng.standard_normal((num_classes, 3, 5, 5)), canvas)
    protos += 0.5 * _upsample(rng.standard_normal((num_classes, 3, 10, 10)), canvas)
    protos += 0.8 * rng.standard_normal((num_classes, 3, 1, 1))  # a mean colour per class
    parts: dict[int, tuple[list[Any], list[Any]]] = {0: ([], []), 1: ([], [])}
    for c in range(num_classes):
        for part, n in enumerate(per_class):
            windows = np.lib.stride_tricks.sliding_window_view(protos[c], (32, 32), axis=(1, 2))
            oy, ox = rng.integers(0, 2 * _PAD + 1, size=(2, n))
            img = windows[:, oy, ox].transpose(1, 0, 2, 3)  # (n, 3, 32, 32)
            gain = 1.0 + 0.25 * rng.standard_normal((n, 3, 1, 1))
            bias = 0.3 * rng.standard_normal((n, 3, 1, 1))
            distractor = _upsample(rng.standard_normal((n, 3, 4, 4)), 32)
            noise = rng.standard_normal((n, 3, 32, 32))
            value = gain * img + bias + 0.5 * distractor + 0.3 * noise
            pixels = np.clip(np.rint(128.0 + 48.0 * value), 0, 255).astype(np.uint8)
            parts[part][0].append(pixels.reshape(n, _PIXELS))
            parts[part][1].append(np.full(n, c, dtype=np.int64))
    out = []
    for part in (0, 1):
        x, y = np.concatenate(parts[part][0]), np.concatenate(parts[part][1])
        perm = rng.permutation(len(y))
        out += [np.ascontiguousarray(x[perm]), y[perm]]
    return tuple(out)


def _complete(folder: Path, layout: str, num_classes: int, n_train: int, n_test: int) -> bool:
    """Whether ``folder`` holds a readable data set of this layout with these class and image counts."""
    try:
        raw = _read_raw(layout, folder.parent)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError):
        return False
    return len(raw.class_names) == num_classes and len(raw.train_y) == n_train and len(raw.test_y) == n_test


def write_synthetic(
    root: str | Path,
    *,
    layout: str = "synthetic",
    num_classes: int = 10,
    train_per_class: int = 500,
    test_per_class: int = 100,
    seed: int = 0,
    exist_ok: bool = False,
) -> Path:
    """Write a deterministic, learnable CIFAR-shaped data set in the real on-disk format; returns its folder.

    ``layout`` "synthetic"/"cifar10" -> CIFAR-10 files (5 train batches, test_batch, batches.meta) in
    synthetic-batches-py / cifar-10-batches-py; "cifar100" -> train/test/meta in cifar-100-python (100 fine
    classes, coarse label = fine // 5). Pickles use protocol 2 and str keys. Output is byte-identical for the
    same arguments. Never overwrites: an existing folder raises FileExistsError, unless ``exist_ok`` and it
    holds a complete data set with the same class and image counts (then it is returned untouched).
    """
    if layout not in LAYOUT_FOLDERS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUT_FOLDERS)}")
    if layout == "cifar100" and num_classes != 100:
        raise ValueError(f"layout cifar100 needs num_classes=100, got {num_classes}")
    if layout == "cifar10" and num_classes != 10:
        raise ValueError(f"layout cifar10 needs num_classes=10, got {num_classes}")
    if num_classes < 2 or train_per_class < 1 or test_per_class < 1:
        raise ValueError(
            "need num_classes >= 2, train_per_class >= 1 and test_per_class >= 1, got "
            f"{num_classes}, {train_per_class}, {test_per_class}"
        )
    root = Path(root).expanduser()
    folder = root / LAYOUT_FOLDERS[layout]
    n_train, n_test = num_classes * train_per_class, num_classes * test_per_class

    def existing() -> Path:
        if exist_ok and _complete(folder, layout, num_classes, n_train, n_test):
            return folder
        why = (
            "it is incomplete or holds a data set of another shape"
            if exist_ok
            else "pass exist_ok=True / --exist-ok to reuse it"
        )
        raise FileExistsError(f"{folder} already exists; not overwriting ({why})")

    if folder.exists():
        return existing()
    train_x, train_y, test_x, test_y = _synthetic_images(num_classes, (train_per_class, test_per_class), seed)
    files: dict[str, dict[str, object]] = {}
    if layout == "cifar100":
        fine = [f"class_{i:03d}" for i in range(num_classes)]
        coarse = [f"superclass_{i:02d}" for i in range(20)]
        for fname, x, y, label in (
            ("train", train_x, train_y, "training batch 1 of 1"),
            ("test", test_x, test_y, "testing batch 1 of 1"),
        ):
            files[fname] = {
                "filenames": [f"{fine[c]}_s_{i:06d}.png" for i, c in enumerate(y)],
                "batch_label": label,
                "fine_labels": y.tolist(),
                "coarse_labels": (y // 5).tolist(),
                "data": x,
            }
        files["meta"] = {"fine_label_names": fine, "coarse_label_names": coarse}
    else:
        names = [f"class_{i:02d}" for i in range(num_classes)]
        pieces = np.array_split(np.arange(len(train_y)), 5)
        for k, idx in enumerate(pieces, start=1):
            files[f"data_batch_{k}"] = {
                "batch_label": f"training batch {k} of 5",
                "labels": train_y[idx].tolist(),
                "data": train_x[idx],
                "filenames": [f"{names[train_y[i]]}_s_{i:06d}.png" for i in idx],
            }
        files["test_batch"] = {
            "batch_label": "testing batch 1 of 1",
            "labels": test_y.tolist(),
            "data": test_x,
            "filenames": [f"{names[c]}_s_{i:06d}.png" for i, c in enumerate(test_y)],
        }
        files["batches.meta"] = {"num_cases_per_batch": len(pieces[0]), "label_names": names, "num_vis": _PIXELS}
    # Write into a private folder and rename it into place: readers never see a half-written data set,
    # and of two concurrent writers exactly one wins the rename.
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, obj in files.items():
            with (tmp / fname).open("wb") as f:
                pickle.dump(obj, f, protocol=2)
        try:
            os.rename(tmp, folder)
        except OSError:
            if folder.exists():
                return existing()
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def download(name: str, root: str | Path) -> Path:
    """Download real CIFAR-10/100 with torchvision (needs internet: run it on a login node)."""
    from torchvision import datasets

    if name not in ("cifar10", "cifar100"):
        raise ValueError(f"can only download cifar10 or cifar100, not {name!r}")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    cls(str(root), train=True, download=True)  # fetches and unpacks the whole archive (train + test)
    return root / LAYOUT_FOLDERS[name]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download real CIFAR files with torchvision (login node, internet)")
    d.add_argument("name", choices=("cifar10", "cifar100"))
    d.add_argument("--root", required=True, help="data folder (the layout's sub-folder is created in it)")
    s = sub.add_parser("synthetic", help="write a synthetic data set in the CIFAR file format")
    s.add_argument("--root", required=True)
    s.add_argument("--layout", choices=tuple(LAYOUT_FOLDERS), default="synthetic")
    s.add_argument("--classes", type=int, default=None, help="default 10 (100 for --layout cifar100)")
    s.add_argument("--train-per-class", type=int, default=500)
    s.add_argument("--test-per-class", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--exist-ok", action="store_true", help="reuse a complete existing data set of this shape")
    i = sub.add_parser("info", help="print sizes, classes and mean/std of a data set")
    i.add_argument("name", choices=DATASETS)
    i.add_argument("--root", required=True)
    i.add_argument("--val-size", type=int, default=0)
    i.add_argument("--split-seed", type=int, default=0)
    i.add_argument("--train-size", type=int, default=0)
    return p


def _print_info(console, name: str, root: str | Path, val_size: int, split_seed: int, train_size: int) -> None:
    from rich.table import Table

    d = load_cifar(name, root, val_size=val_size, split_seed=split_seed, train_size=train_size)
    t = Table(title=f"{name} in {Path(root).expanduser() / LAYOUT_FOLDERS[name]}")
    t.add_column("split")
    t.add_column("images", justify="right")
    for split_name in ("train", "val", "test"):
        t.add_row(split_name, str(len(getattr(d, split_name))))
    console.print(t)
    shown = ", ".join(d.class_names[:10]) + (", ..." if d.num_classes > 10 else "")
    console.print(f"classes: {d.num_classes} ({shown})")
    console.print("mean (train split, [0,1]): " + ", ".join(f"{m:.4f}" for m in d.mean))
    console.print("std  (train split, [0,1]): " + ", ".join(f"{s:.4f}" for s in d.std))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 for bad input)."""
    from rich.console import Console
    from rich.markup import escape  # error text holds paths: "[...]" in one is not markup

    args = _parser().parse_args(argv)
    # soft_wrap: long paths stay on one line (copy-pastable)
    out, err = Console(soft_wrap=True, highlight=False), Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        if args.command == "download":
            folder = download(args.name, args.root)
            out.print(f"[green]downloaded[/] {args.name} to {folder}")
            _print_info(out, args.name, args.root, 0, 0, 0)
        elif args.command == "synthetic":
            classes = args.classes if args.classes is not None else (100 if args.layout == "cifar100" else 10)
            existed = (Path(args.root).expanduser() / LAYOUT_FOLDERS[args.layout]).exists()
            folder = write_synthetic(
                args.root,
                layout=args.layout,
                num_classes=classes,
                train_per_class=args.train_per_class,
                test_per_class=args.test_per_class,
                seed=args.seed,
                exist_ok=args.exist_ok,
            )
            verb = "kept existing" if existed else "wrote"
            out.print(
                f"{verb} {folder}: {classes} classes, {classes * args.train_per_class} train + "
                f"{classes * args.test_per_class} test images (seed {args.seed})"
            )
            for f in sorted(folder.iterdir()):
                out.print(f"  {f.name}  {f.stat().st_size:,} bytes")
        else:
            _print_info(out, args.name, args.root, args.val_size, args.split_seed, args.train_size)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2
    except OSError as e:  # e.g. no network for download
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
