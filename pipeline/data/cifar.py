"""CIFAR files on disk: the "python version" pickles read safely (only the globals CIFAR files use),
split into train/val/test, and downloaded with torchvision (login node)."""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

DATASETS = ("cifar10", "cifar100", "synthetic")
# Folder under the data root for each data set name (= write_synthetic layout).
LAYOUT_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "synthetic": "synthetic-batches-py"}
_CIFAR10_FILES = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta")
_CIFAR100_FILES = (["train"], ["test"], "meta")
PIXELS = 3 * 32 * 32
PAD = 4


def _files_for(name: str) -> tuple[list[str], list[str], str]:
    return _CIFAR100_FILES if name == "cifar100" else _CIFAR10_FILES


def _hint(name: str, root: Path) -> str:
    if name == "synthetic":
        return f"python -m pipeline.data synthetic --root {root}"
    return f"python -m pipeline.data download {name} --root {root}"


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
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != PIXELS or len(y) != len(x):
            raise ValueError(
                f"{p}: expected uint8 data of shape (N, {PIXELS}) and N labels, "
                f"got {x.dtype} {x.shape} and {len(y)} labels"
            )
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{p}: labels outside [0, {num_classes}) (meta lists {num_classes} classes)")
        xs.append(x)
        ys.append(y)
    x = np.concatenate(xs) if xs else np.zeros((0, PIXELS), np.uint8)
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
