"""Model files of a run folder (``<run>/models/``): written atomically, loadable in a fresh process with
``torch.load(weights_only=True)`` (no arbitrary objects are unpickled), structurally pruned ones included.

A state-dict file holds::

    {"format": "pipeline-model/1", "arch": {"name", "num_classes", "shortcut", "norm"},
     "state_dict": {...}, "dtype": "float32" | "float16"}

The architecture is rebuilt from the registry and resized to the tensors' shapes, so a pruned model
loads without running the pruner again. Exported int8 programs (``.pt2``) live beside them and are
written by :mod:`pipeline.compress.quantize`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from pipeline.rundir import atomic_write_bytes, model_file_problem

FORMAT = "pipeline-model/1"

# file names under <run>/models/, by what made them
TRAINED = "trained.pt"
PRUNED = "pruned.pt"
INT8 = "int8.pt2"
FP16 = "fp16.pt"


class UnreadableModel(ValueError):
    """A model file that cannot be loaded (missing, truncated, garbled, not a model): ``path`` names it,
    ``reason`` says what is wrong. The job marks the stage that wrote it failed (:mod:`pipeline.run`)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"model file {path} is unreadable: {reason}")


def arch_of(cfg: Any, num_classes: int) -> dict[str, Any]:
    """What rebuilds a run's architecture: registry name, classes, shortcut, norm."""
    return {
        "name": str(cfg.model.name),
        "num_classes": int(num_classes),
        "shortcut": str(cfg.model.shortcut),
        "norm": str(cfg.model.norm),
    }


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename: a kill never leaves half a file.

    The object is serialised in memory first: on a full disk torch's own stream reports only
    "basic_ios::clear: iostream error", while a plain write fails with OSError naming ``path`` and the
    system's reason ("No space left on device", "Disk quota exceeded", "Read-only file system")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (unwrapped from DDP / torch.compile), tensors detached on the CPU."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_model(
    path: Path, model: nn.Module, arch: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None
) -> None:
    sd = plain_state_dict(model)
    dtype = "float16" if any(v.dtype == torch.float16 for v in sd.values()) else "float32"
    atomic_torch_save(
        {"format": FORMAT, "arch": dict(arch), "state_dict": sd, "dtype": dtype, "extra": dict(extra or {})}, path
    )


def build_from_arch(arch: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A registry model of ``arch``; with ``state_dict``, resized to its shapes (pruned models) and loaded."""
    from pipeline.models import build_model, convert_norm

    model = convert_norm(
        build_model(arch["name"], int(arch["num_classes"]), shortcut=arch.get("shortcut", "A")),
        arch.get("norm", "batch"),
    )
    if state_dict is not None:
        from pipeline.compress.structured import resize_to_state_dict

        resize_to_state_dict(model, state_dict)
        model.load_state_dict(state_dict)
    return model


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, the file's dict without the weights). Refuses anything but weights and
    plain containers (``weights_only=True``). A file that cannot give the model (missing, truncated,
    garbled, another format, tensors that fit no model) raises :class:`UnreadableModel` naming it."""
    problem = model_file_problem(Path(path), whole=True)  # (torch.load does not check tensors' checksums)
    if problem is not None:
        raise UnreadableModel(path, problem)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UnreadableModel(path, f"torch.load failed ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or not isinstance(blob.get("state_dict"), dict):
        raise UnreadableModel(path, f"not a {FORMAT} file")
    sd = blob["state_dict"]
    try:
        model = build_from_arch(blob["arch"], sd)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UnreadableModel(path, f"its tensors fit no {blob.get('arch')} model ({type(e).__name__}: {e})") from e
    if blob.get("dtype") == "float16":
        model = model.half()
    info = {k: v for k, v in blob.items() if k != "state_dict"}
    return model.to(device).eval(), info
