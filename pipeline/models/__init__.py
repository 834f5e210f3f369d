"""Model registry for CIFAR-sized (32x32 RGB) image classifiers.

Importing this package must stay cheap: login-node commands import it only to
validate model names in configs, so torch is imported lazily inside functions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "MODEL_NAMES",
    "SHORTCUTS",
    "activation_memory_bytes",
    "build_model",
    "convert_norm",
    "count_macs",
]

# name -> "module:function", resolved only when a model is actually built.
_REGISTRY: dict[str, str] = {
    "resnet20": "resnet_cifar:resnet20",
    "resnet32": "resnet_cifar:resnet32",
    "resnet44": "resnet_cifar:resnet44",
    "resnet56": "resnet_cifar:resnet56",
    "resnet110": "resnet_cifar:resnet110",
    "preact_resnet164": "preact_resnet:preact_resnet164",
    "googlenet": "googlenet:googlenet",
    "resnet9": "resnet9:resnet9",
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)
SHORTCUTS: tuple[str, ...] = ("A", "B")
NORMS: tuple[str, ...] = ("batch", "group")

# Only the CIFAR ResNets of He et al. have the option A/B shortcut choice.
_TAKES_SHORTCUT = frozenset({"resnet20", "resnet32", "resnet44", "resnet56", "resnet110"})


def build_model(name: str, num_classes: int, *, shortcut: str = "A") -> torch.nn.Module:
    """Build a freshly initialised model by registry name.

    ``shortcut`` ("A" parameter-free, "B" projection) applies only to
    resnet20..resnet110; the other models ignore it.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; allowed: {', '.join(SHORTCUTS)}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    module_name, func_name = _REGISTRY[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    factory = getattr(module, func_name)
    if name in _TAKES_SHORTCUT:
        return factory(num_classes, shortcut=shortcut)
    return factory(num_classes)


def convert_norm(model: torch.nn.Module, norm: str) -> torch.nn.Module:
    """Replace every BatchNorm2d by the ``norm`` layer ("batch" leaves the model as it is).

    "group" (GroupNorm, affine, up to 16 groups) normalises each image on its own, so training does not
    depend on how a batch is split over data-parallel ranks: on CPUs, where SyncBatchNorm does not run,
    it is what makes a 2-process run equal to a 1-process one.
    """
    import math

    from torch import nn

    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; allowed: {', '.join(NORMS)}")
    if norm == "batch":
        return model
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            setattr(model, name, nn.GroupNorm(math.gcd(c, 16), c, eps=child.eps))
        else:
            convert_norm(child, norm)
    return model


def count_macs(model: torch.nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates per image of all Conv2d and Linear layers.

    Counted from the actual output shapes seen by forward hooks during one
    forward pass in eval mode (no gradients); other layers are ignored.
    """
    import torch
    from torch import nn

    batch = input_size[0]
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        per_output = (module.in_channels // module.groups) * kh * kw
        total += output.numel() * per_output

    def linear_hook(module: nn.Linear, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // batch


def activation_memory_bytes(model: torch.nn.Module, batch_size: int) -> int:
    """Bytes of tensors autograd saves for backward in one training-mode forward.

    Runs a real fp32 forward on CPU at ``batch_size`` with 3x32x32 inputs and
    sums unique storages captured by ``saved_tensors_hooks``; storages of the
    model's own parameters and buffers are excluded (they are not activations).
    The model's BatchNorm running statistics are restored afterwards.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def ptr(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    owned = {ptr(p) for p in model.parameters()} | {ptr(b) for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    # A training-mode forward updates BN running stats; snapshot to undo that.
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        model.train()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros(batch_size, 3, 32, 32, dtype=torch.float32, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            # Keeping `out` alive keeps the graph (and so every saved storage)
            # alive, so data pointers cannot be recycled mid-measurement.
            out = model(x)
        total = sum(saved.values())
        del out
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return total
