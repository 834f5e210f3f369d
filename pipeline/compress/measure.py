"""Measure every model of a run side by side, in one process, fairly: :func:`measure_artifacts`.

Each model (fp32, pruned, int8, fp16, ...) is described by an :class:`Artifact`: its file on disk (for the
file size), how to load the runnable, optionally the fp32 ``nn.Module`` it came from (for MACs and parameter
counts when the runnable is an exported or quantized graph), the device, the input dtype and memory format.
An artifact that also carries a ``loader_spec`` (see :func:`load_from_spec`) can be rebuilt in another
process, which is how peak CPU memory is measured (``python -m pipeline.compress.measure_memory``).

Model files are the project's own format (:mod:`pipeline.models.files`: written by ``save_model``, read by
``load_model``; structurally pruned ones included).
"""

from __future__ import annotations

import copy
import gc
import gzip
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pipeline.jobs.procs import cpu_name
from pipeline.models.files import DTYPES, load_int8_package, load_model_file, load_pt2, model_file_dtype, unwrap

__all__ = [
    "Artifact",
    "count_flop_macs",
    "count_parameters",
    "cpu_flags",
    "file_sizes",
    "format_table",
    "load_from_spec",
    "measure_artifacts",
]

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LOADER_KINDS = ("state_dict", "pt2", "package")
# /proc/cpuinfo flags that decide whether int8 is fast: VNNI (AVX-512 or AVX) or AMX int8 instructions
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
RECORDED_FLAGS = ("avx2", "avx512f", *INT8_FLAGS)

# glibc serves allocations at or above this size with their own mmap and unmaps them on free, so resident
# memory follows live tensors instead of what the allocator keeps cached from the warm-up call.
MMAP_THRESHOLD = 4096


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_from_spec(
    spec: dict[str, Any], *, device: str | torch.device = "cpu", channels_last: bool = False
) -> Callable[[Tensor], Tensor]:
    """The runnable a loader spec describes; the spec is plain JSON so another process can rebuild it.

    ``{"kind": "state_dict", "path": P}``: a model file (:func:`pipeline.models.files.load_model_file`), moved to
    channels_last if asked. ``{"kind": "pt2", "path": P}``: ``torch.export.load(P).module()`` (through
    :func:`pipeline.models.files.load_pt2`). ``{"kind": "package", "path": P, "sha256": H, "program": Q}``: the
    AOTInductor package P (:func:`pipeline.models.files.load_int8_package`: only when its sha256 is H),
    compiled already; the exported program Q it was compiled from gives its parameter count.
    ``"compile": true`` wraps either in ``torch.compile`` with inductor freezing
    (:func:`pipeline.compress.quantize.compile_int8`;
    compiled at the first call of each shape, which :func:`measure_artifacts` makes before timing).
    """
    kind = spec.get("kind")
    path = spec.get("path")
    if kind not in LOADER_KINDS or not path:
        raise ValueError(f"loader spec needs kind in {LOADER_KINDS} and a path, got {spec!r}")
    device = torch.device(device)
    if kind == "package":
        return _PackageRunner(Path(path), str(spec.get("sha256", "")), spec.get("program"))
    if kind == "state_dict":
        model: nn.Module = load_model_file(path, device=device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
    else:
        model = load_pt2(Path(path)).module()
        if device.type != "cpu":
            model = model.to(device)
    if spec.get("compile"):
        # inductor with freezing (int8 weights prepacked into oneDNN kernels), compiled and warmed up
        # here; a graph inductor cannot compile falls back to eager, and says why in compile_info
        from pipeline.compress.quantize import compile_int8

        # in the weights' dtype: an fp16 model refuses fp32 inputs, and compile_int8 would fall back to eager
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        example = torch.zeros(1, 3, 32, 32, device=device, dtype=dtype)
        if channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        fn, info = compile_int8(model, example)
        fn.compile_info = info  # type: ignore[attr-defined]
        return fn
    return model


class _PackageRunner:
    """An AOTInductor package as a runnable: no compile (``compile_info`` says so); ``_orig_mod``, the
    exported int8 program it was compiled from, is loaded only when something counts its parameters."""

    def __init__(self, path: Path, sha256: str, program: str | None) -> None:
        self._run = load_int8_package(path, sha256)
        self._program = program
        self._module: nn.Module | None = None
        self.compile_info = {"compiled": True, "backend": "aoti", "package": path.name, "fallback_reason": None}

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():  # compiled for NCHW-contiguous input, and it does not check strides
            return self._run(x.contiguous())

    @property
    def _orig_mod(self) -> nn.Module | None:
        if self._module is None and self._program:
            self._module = load_pt2(Path(self._program)).module()
        return self._module


@dataclass
class Artifact:
    """One model to measure.

    ``load()`` returns the runnable (an ``nn.Module``, an exported graph, a compiled callable). ``source`` is
    an fp32 module of the same architecture and weights, used for MACs, and for parameter counts when the
    runnable is not an ``nn.Module``. ``dtype`` and ``channels_last`` describe the inputs the runnable takes.
    ``loader_spec`` (see :func:`load_from_spec`) lets another process rebuild the runnable: without it the
    CPU memory figures are not measured; without ``load`` the runnable is built from it. ``notes`` are copied
    to the output. ``untimed``: the reason the artifact gets static figures and accuracy but no timing,
    profile or memory (an int8 program with no compiled form: run eagerly it dequantizes, runs fp32 kernels
    and quantizes again, which says nothing about int8 speed).
    """

    name: str
    path: str | os.PathLike | None
    load: Callable[[], Callable[[Tensor], Tensor]] | None = None
    source: nn.Module | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    notes: dict = field(default_factory=dict)
    loader_spec: dict | None = None
    untimed: str | None = None

    def __post_init__(self) -> None:
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"{self.name}: device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{self.name}: dtype must be torch.float32 or torch.float16, got {self.dtype}")
        if self.loader_spec is not None:
            self.loader_spec = json.loads(json.dumps(self.loader_spec, default=str))
        if self.load is None:
            if self.loader_spec is None:
                raise ValueError(f"{self.name}: give load or loader_spec")
            spec, device, channels_last = self.loader_spec, self.device, self.channels_last
            self.load = lambda: load_from_spec(spec, device=device, channels_last=channels_last)

    @classmethod
    def from_model_file(
        cls,
        name: str,
        path: str | os.PathLike,
        *,
        device: str = "cpu",
        channels_last: bool = False,
        compile: bool = False,
        notes: dict | None = None,
    ) -> Artifact:
        """A model file (:mod:`pipeline.models.files`); the input dtype is the file's."""
        dtype = model_file_dtype(Path(path))
        return cls(
            name,
            path,
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            notes=dict(notes or {}),
            loader_spec={"kind": "state_dict", "path": str(path), "compile": bool(compile)},
        )

    @classmethod
    def from_pt2(
        cls,
        name: str,
        path: str | os.PathLike,
        *,
        source: nn.Module | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        compile: bool = False,
        notes: dict | None = None,
        untimed: str | None = None,
    ) -> Artifact:
        """An exported program saved with ``torch.export.save`` (e.g. a PT2E int8 graph)."""
        return cls(
            name,
            path,
            source=source,
            device=device,
            dtype=dtype,
            channels_last=channels_last,
            notes=dict(notes or {}),
            loader_spec={"kind": "pt2", "path": str(path), "compile": bool(compile)},
            untimed=untimed,
        )

    @classmethod
    def from_package(
        cls,
        name: str,
        package: str | os.PathLike,
        *,
        sha256: str,
        program: str | os.PathLike,
        source: nn.Module | None = None,
        channels_last: bool = False,
        notes: dict | None = None,
    ) -> Artifact:
        """An AOTInductor package (``models/int8.so.pt2``), run as compiled, loaded only if its sha256 is
        ``sha256``. ``program`` is the exported program it was compiled from: its file size is the model's
        size, and its graph gives the parameter count."""
        return cls(
            name,
            program,
            source=source,
            channels_last=channels_last,
            notes=dict(notes or {}),
            loader_spec={"kind": "package", "path": str(package), "sha256": sha256, "program": str(program)},
        )


# --------------------------------------------------------------------------------------------------
# Static figures: file size, parameters, MACs
# --------------------------------------------------------------------------------------------------


class _CountingWriter:
    def __init__(self) -> None:
        self.n = 0

    def write(self, b: bytes) -> int:
        self.n += len(b)
        return len(b)

    def flush(self) -> None:
        pass


def file_sizes(path: str | os.PathLike | None) -> tuple[int | None, int | None]:
    """(raw bytes, gzip level-9 bytes) of a file, compressed as a stream (nothing held in memory)."""
    if path is None:
        return None, None
    counter = _CountingWriter()
    with open(path, "rb") as f, gzip.GzipFile(fileobj=counter, mode="wb", compresslevel=9, mtime=0) as gz:
        shutil.copyfileobj(f, gz, 1 << 20)
    return os.path.getsize(path), counter.n


def _is_qdq(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and "quantize" in str(node.target)


def _attr(module: nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _graph_weights(gm: torch.fx.GraphModule) -> dict[int, Tensor]:
    """Tensors a graph really reads: parameters and quantized values, not scales or zero points.

    A get_attr tensor counts when it is an ``nn.Parameter`` or the value (first argument) of a quantize /
    dequantize op (the int8 weights a PT2E convert folds in); one used only as the scale or zero point of
    such ops does not, nor does a buffer such as a BatchNorm running mean. Tensors no node reads (the
    original fp32 weights a converted graph keeps, which a re-exported graph even reads into get_attr nodes
    without users) are ignored. Leaf modules called from the graph count
    with their parameters.
    """
    found: dict[int, Tensor] = {}
    for sub in gm.modules():
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        for node in sub.graph.nodes:
            if node.op == "call_module":
                leaf = sub.get_submodule(node.target)
                if not isinstance(leaf, torch.fx.GraphModule):
                    found.update((id(p), p) for p in leaf.parameters())
                continue
            if node.op != "get_attr":
                continue
            t = _attr(sub, node.target)
            if not isinstance(t, Tensor):
                continue
            uses = [(u, i) for u in node.users for i, a in enumerate(u.args) if a is node]
            uses += [(u, k) for u in node.users for k, a in u.kwargs.items() if a is node]
            qdq_value = any(_is_qdq(u) and i in (0, "input") for u, i in uses)
            qdq_param_only = bool(uses) and all(_is_qdq(u) and i not in (0, "input") for u, i in uses)
            if qdq_value or (isinstance(t, nn.Parameter) and uses and not qdq_param_only):
                found[id(t)] = t
    return found


def count_parameters(model: Any) -> tuple[int, int] | None:
    """(parameters, non-zero parameters) of an ``nn.Module`` or graph (see :func:`_graph_weights`);
    None for anything else or when it holds no weights."""
    m = unwrap(model)
    if not isinstance(m, nn.Module):
        return None
    if isinstance(m, torch.fx.GraphModule):
        tensors = list(_graph_weights(m).values())
    else:
        tensors = list(m.parameters())
    if not tensors:
        return None
    with torch.no_grad():
        return (sum(t.numel() for t in tensors), sum(int(torch.count_nonzero(t)) for t in tensors))


def _set_training(m: nn.Module, mode: bool) -> None:
    try:
        m.train(mode)
    except NotImplementedError:  # exported graphs refuse .train()/.eval(); they run as they were exported
        pass


def count_flop_macs(
    model: Any,
    input_shape: tuple[int, ...],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> int:
    """MACs per image: ``FlopCounterMode`` FLOPs of one batch-1 eval forward, / 2 (FLOPs = 2 x MACs).

    The device and dtype of the input default to those of the model's first parameter (or buffer).
    """
    from torch.utils.flop_counter import FlopCounterMode

    m = unwrap(model)
    ref: Tensor | None = next(iter(m.parameters()), None) if isinstance(m, nn.Module) else None
    if ref is None and isinstance(m, nn.Module):
        ref = next((b for b in m.buffers() if b.is_floating_point()), None)
    device = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
    if dtype is None:
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    was_training = m.training if isinstance(m, nn.Module) else False
    if isinstance(m, nn.Module):
        _set_training(m, False)
    try:
        x = torch.zeros((1, *input_shape), device=device, dtype=dtype)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x)
    finally:
        if isinstance(m, nn.Module) and was_training:
            _set_training(m, True)
    return int(counter.get_total_flops()) // 2


# --------------------------------------------------------------------------------------------------
# Runtime figures
# --------------------------------------------------------------------------------------------------


def _prepare(x: Tensor, device: torch.device, dtype: torch.dtype, channels_last: bool) -> Tensor:
    x = x.to(device=device, dtype=dtype)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _accuracy(
    fn: Callable, batches: Iterable, device: torch.device, dtype: torch.dtype, channels_last: bool
) -> dict[str, Any]:
    """As ``pipeline.stages.loop.evaluate``: mean loss, top-1 and top-5 over every batch."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top1 = torch.zeros((), device=device, dtype=torch.int64)
    top5 = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for x, y in batches:
        x, y = _prepare(x, device, dtype, channels_last), y.to(device)
        out = fn(x).float()
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        pred = out.topk(min(5, out.shape[1]), dim=1).indices
        hit = pred == y[:, None]
        top1 += hit[:, 0].sum()
        top5 += hit.any(dim=1).sum()
        seen += int(y.shape[0])
    if seen == 0:
        return {"test_images": 0, "test_loss": None, "test_top1": None, "test_top5": None}
    return {
        "test_images": seen,
        "test_loss": loss_sum.item() / seen,
        "test_top1": top1.item() / seen,
        "test_top5": top5.item() / seen,
    }


def _time_once(fn: Callable, x: Tensor, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    out = fn(x)
    _sync(device)
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


def _profile_once(fn: Callable, x: Tensor, device: torch.device) -> tuple[float, float | None]:
    """(self CPU µs, self CUDA µs or None) summed over the events of one profiled forward, as the footer of
    ``prof.key_averages().table()`` sums them."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(device)
    with profile(activities=activities) as prof:
        out = fn(x)
        _sync(device)
    del out
    events = prof.key_averages()
    cpu_us = float(sum(e.self_cpu_time_total for e in events))
    if not cuda:
        return cpu_us, None
    # As the footer: kernels are events of device type CUDA (user annotations aside); the legacy profiler
    # kept kernel time on the CPU events instead.
    cuda_us = float(
        sum(
            e.self_device_time_total
            for e in events
            if (e.device_type == DeviceType.CUDA and not e.is_user_annotation)
            or (e.device_type == DeviceType.CPU and e.is_legacy)
        )
    )
    return cpu_us, cuda_us


def _cuda_peak(fn: Callable, x: Tensor, device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        out = fn(x)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return max(0, int(peak))


def _repo_root() -> str:
    import pipeline

    return str(Path(pipeline.__file__).resolve().parents[1])


def _cpu_memory(
    art: Artifact, input_shape: tuple[int, ...], batches: list[int], threads: int, warmup: int, timeout_s: float
) -> dict[str, Any]:
    """Run ``python -m pipeline.compress.measure_memory`` for one artifact; its JSON answer."""
    spec = {
        "loader": art.loader_spec,
        "dtype": _DTYPE_NAMES[art.dtype],
        "channels_last": art.channels_last,
        "input_shape": list(input_shape),
        "batches": batches,
        "threads": threads,
        "warmup": warmup,
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_repo_root(), env.get("PYTHONPATH", "")) if p)
    env.update(
        {
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
        }
    )
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.compress.measure_memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"measure_memory exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def _plain(v: Any) -> Any:
    """JSON-serialisable copy (plain dict/list/str/int/float/bool/None)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Tensor):
        return _plain(v.tolist())
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if hasattr(v, "item") and callable(v.item):  # numpy scalars
        return _plain(v.item())
    return str(v)


def _runtime(fn: Any) -> str:
    """How the runnable runs: "aoti" (a package), "inductor" (compiled here) or "eager"."""
    info = getattr(fn, "compile_info", None) or {}
    return str(info.get("backend")) if info.get("compiled") else "eager"


def cpu_flags() -> dict[str, bool]:
    """The int8-relevant flags of this CPU (:data:`RECORDED_FLAGS`, from /proc/cpuinfo; all False where it
    cannot be read). int8 kernels beat fp32 only with one of :data:`INT8_FLAGS`."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {flag: flag in flags for flag in RECORDED_FLAGS}


def _median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


# --------------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------------


def _check_artifacts(artifacts: list[Artifact]) -> None:
    names = [a.name for a in artifacts]
    if len(set(names)) != len(names):
        raise ValueError(f"artifact names must be unique, got {names}")
    for a in artifacts:
        if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{a.name}: device {a.device} but CUDA is not available")


def _batches_source(test_data: Iterable | Callable[[], Iterable]) -> Callable[[], Iterable]:
    """A callable giving the test batches afresh for each model (a one-shot iterator is read once)."""
    if callable(test_data) and not hasattr(test_data, "__iter__"):
        return test_data
    batches = list(test_data) if iter(test_data) is test_data else test_data  # keep a one-shot's batches
    return lambda: batches


def measure_artifacts(
    artifacts: list[Artifact],
    test_data: Iterable | Callable[[], Iterable],
    *,
    threads: int,
    latency_repeats: int = 50,
    throughput_batch: int = 256,
    throughput_repeats: int = 5,
    warmup: int = 3,
    profile: bool = True,
    memory: bool = True,
    memory_timeout_s: float = 900.0,
) -> list[dict[str, Any]]:
    """Measure every artifact under the same conditions; one JSON-serialisable dict per artifact, in order.

    ``test_data`` is an iterable of ``(x, y)`` batches that can be iterated once per artifact (a list, a
    ``DeviceLoader``), or a zero-argument callable returning a fresh one; a one-shot iterator is read into
    a list first. Its first batch gives the image shape of the timing inputs.

    Order: every artifact is loaded first; then the static figures (file size, parameters, MACs) and the
    test accuracy of each; then the timing. FAIRNESS: timing alternates between the models so that load on
    the machine (other jobs, frequency changes) falls on all of them alike: each model gets ``warmup``
    untimed forwards at batch 1 and at ``throughput_batch`` (compiling there), then each of the
    ``latency_repeats`` rounds times one batch-1 forward of every model in turn (A, B, C, A, B, C, ...),
    then each of the ``throughput_repeats`` rounds one ``throughput_batch`` forward of every model in turn,
    then (``profile``) each of ``throughput_repeats`` rounds profiles one ``throughput_batch`` forward of
    every model in turn. Medians are reported. The garbage collector is off while timing; CUDA is
    synchronized before and after each timed forward. Timing inputs are one fixed random batch (seed 0),
    the same for every model, cast to each model's dtype and memory format.

    Memory (``memory``): on CUDA in this process, ``max_memory_allocated`` after
    ``reset_peak_memory_stats`` minus what was allocated before one forward; on the CPU in a fresh
    subprocess per model (:mod:`pipeline.compress.measure_memory`, rebuilt from ``loader_spec``): warm-up,
    ``echo 5 > /proc/self/clear_refs``, one forward, VmHWM minus the VmRSS read just before the forward.
    Subprocesses run after all timing, one at a time.

    fp16 on the CPU: there are no fast fp16 kernels there (ResNet-20 ran ~17x slower than in fp32), so such
    an artifact gets its static figures and its accuracy, computed in fp32 from a copy of the module with
    its fp16 weights upcast (exact; ``compute_dtype`` says so; in fp16 if the runnable is no module), but
    no timing, profile or memory figures (None, the reason in ``skipped``).

    All runs use ``torch.set_num_threads(threads)`` (restored afterwards; subprocesses get the same;
    0 keeps the current ``torch.get_num_threads()``).
    """
    if threads < 0 or latency_repeats < 1 or throughput_batch < 1 or throughput_repeats < 1 or warmup < 1:
        raise ValueError(
            "need threads >= 0, latency_repeats >= 1, throughput_batch >= 1, throughput_repeats >= 1 and warmup >= 1"
        )
    _check_artifacts(artifacts)
    batches_for = _batches_source(test_data)
    first = next(iter(batches_for()), None)
    if first is None:
        raise ValueError("test_data yielded no batches")
    input_shape = tuple(int(s) for s in first[0].shape[1:])
    del first

    old_threads = torch.get_num_threads()
    threads = threads or old_threads
    torch.set_num_threads(threads)
    try:
        return _measure(
            artifacts,
            batches_for,
            input_shape,
            threads=threads,
            latency_repeats=latency_repeats,
            throughput_batch=throughput_batch,
            throughput_repeats=throughput_repeats,
            warmup=warmup,
            profile=profile,
            memory=memory,
            memory_timeout_s=memory_timeout_s,
        )
    finally:
        torch.set_num_threads(old_threads)


@dataclass
class _Timing:
    """How :func:`measure_artifacts` times (its arguments of the same names)."""

    threads: int
    latency_repeats: int
    throughput_batch: int
    throughput_repeats: int
    warmup: int
    profile: bool


@dataclass
class _Loaded:
    """One artifact loaded: what is timed, what computes its accuracy (with that dtype), its entry."""

    artifact: Artifact
    device: torch.device
    runnable: Callable[[Tensor], Tensor]
    compute: tuple[Callable[[Tensor], Tensor], torch.dtype]
    entry: dict[str, Any]


def _measure(
    artifacts: list[Artifact],
    batches_for: Callable[[], Iterable],
    input_shape: tuple[int, ...],
    *,
    threads: int,
    latency_repeats: int,
    throughput_batch: int,
    throughput_repeats: int,
    warmup: int,
    profile: bool,
    memory: bool,
    memory_timeout_s: float,
) -> list[dict[str, Any]]:
    timing = _Timing(threads, latency_repeats, throughput_batch, throughput_repeats, warmup, profile)
    loaded = [_load(a, dev, threads) for a, dev in zip(artifacts, _devices(artifacts))]  # everything first
    for m in loaded:  # static figures and accuracy, one model at a time (nothing timed)
        _static_figures(m, input_shape)
        m.entry.update(_accuracy(m.compute[0], batches_for(), m.device, m.compute[1], m.artifact.channels_last))
        m.compute = (m.runnable, m.artifact.dtype)  # let an fp32 copy made for the accuracy go
    inputs = _timing_inputs(loaded, input_shape, throughput_batch)
    timed = [i for i, m in enumerate(loaded) if m.entry["skipped"] is None]
    samples = _time_interleaved(loaded, inputs, timed, timing)
    order = [loaded[i].entry["name"] for i in timed]
    for i, m in enumerate(loaded):
        m.entry.update(_timing_figures(samples, i, order, timing))
        m.entry.update(peak_memory_b1_bytes=None, peak_memory_batch_bytes=None, memory_method=None, memory_error=None)
    for i in timed:
        if memory:
            _peak_memory(loaded[i], inputs[i], input_shape, timing, memory_timeout_s)
        else:
            loaded[i].entry["memory_method"] = "not measured (memory=False)"
    for m in loaded:
        m.entry["notes"] = m.artifact.notes
    return [_plain(m.entry) for m in loaded]


def _devices(artifacts: list[Artifact]) -> list[torch.device]:
    """Each artifact's device, a bare "cuda" made the current CUDA device."""
    devices = [torch.device(a.device) for a in artifacts]
    if any(d.type == "cuda" and d.index is None for d in devices):
        devices = [
            torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None else d
            for d in devices
        ]
    return devices


def _load(a: Artifact, dev: torch.device, threads: int) -> _Loaded:
    """Load ``a`` (timed) and start its entry; fp16 on the CPU is not timed, its accuracy computed in fp32."""
    t0 = time.perf_counter()
    assert a.load is not None  # __post_init__ builds it from loader_spec
    fn = a.load()
    if isinstance(fn, nn.Module):
        _set_training(fn, False)
    load_s = time.perf_counter() - t0
    skipped, compute = a.untimed, (fn, a.dtype)
    if dev.type == "cpu" and a.dtype == torch.float16:
        skipped = "fp16 on the CPU (no fast fp16 kernels): timing, profile and memory not measured"
        if isinstance(unwrap(fn), nn.Module):
            compute = (copy.deepcopy(unwrap(fn)).float(), torch.float32)
            skipped += "; accuracy computed in fp32 from the fp16 weights (an exact upcast)"
    entry = {
        "name": a.name,
        "device": str(dev),
        "device_name": _device_name(dev),
        "dtype": _DTYPE_NAMES[a.dtype],
        "compute_dtype": _DTYPE_NAMES[compute[1]],
        "channels_last": bool(a.channels_last),
        "threads": threads,
        "file": None if a.path is None else str(a.path),
        "load_s": load_s,
        "skipped": skipped,
        "compile": getattr(fn, "compile_info", None),
        "runtime": _runtime(fn),
        "loader": a.loader_spec,
    }
    return _Loaded(a, dev, fn, compute, entry)


def _static_figures(m: _Loaded, input_shape: tuple[int, ...]) -> None:
    """File sizes, parameters and MACs per image; counted on the runnable, else on its source model."""
    a, fn, e = m.artifact, m.runnable, m.entry
    e["file_bytes"], e["file_gzip_bytes"] = file_sizes(a.path)
    counted, counted_from = count_parameters(fn), "runnable"
    if counted is None and a.source is not None:
        counted, counted_from = count_parameters(a.source), "source"
    e["parameters"], e["nonzero_parameters"] = counted if counted is not None else (None, None)
    e["parameters_from"] = counted_from if counted is not None else None
    mac_model, mac_from = (a.source, "source") if a.source is not None else (unwrap(fn), "runnable")
    if isinstance(mac_model, nn.Module):
        e["macs_per_image"], e["macs_from"] = count_flop_macs(mac_model, input_shape), mac_from
    else:
        e["macs_per_image"], e["macs_from"] = None, None


def _timing_inputs(loaded: list[_Loaded], input_shape: tuple[int, ...], batch: int) -> list[tuple[Tensor, Tensor]]:
    """Each model's timing inputs (batch 1, ``batch``): one fixed random batch (seed 0), cast per
    (device, dtype, memory format)."""
    base = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    cache: dict[tuple, tuple[Tensor, Tensor]] = {}
    inputs: list[tuple[Tensor, Tensor]] = []
    for m in loaded:
        a, dev = m.artifact, m.device
        key = (str(dev), a.dtype, a.channels_last)
        if key not in cache:
            cache[key] = (
                _prepare(base[:1].clone(), dev, a.dtype, a.channels_last),
                _prepare(base, dev, a.dtype, a.channels_last),
            )
        inputs.append(cache[key])
    return inputs


@dataclass
class _Samples:
    """Per timed model (by index): seconds per batch-1 and per large-batch forward, profiled µs."""

    latency: dict[int, list[float]]
    throughput: dict[int, list[float]]
    prof_cpu: dict[int, list[float]]
    prof_cuda: dict[int, list[float]]


def _time_interleaved(
    loaded: list[_Loaded], inputs: list[tuple[Tensor, Tensor]], timed: list[int], t: _Timing
) -> _Samples:
    """Warm-up, then rounds that time every model in turn (see :func:`measure_artifacts`); the garbage
    collector is off while timing."""
    s = _Samples({i: [] for i in timed}, {i: [] for i in timed}, {i: [] for i in timed}, {i: [] for i in timed})
    gc_was_enabled = gc.isenabled()
    try:
        with torch.no_grad():
            for i in timed:
                for x in inputs[i]:
                    for _ in range(t.warmup):
                        _time_once(loaded[i].runnable, x, loaded[i].device)
            gc.collect()
            gc.disable()
            for _ in range(t.latency_repeats):
                for i in timed:
                    s.latency[i].append(_time_once(loaded[i].runnable, inputs[i][0], loaded[i].device))
            for _ in range(t.throughput_repeats):
                for i in timed:
                    s.throughput[i].append(_time_once(loaded[i].runnable, inputs[i][1], loaded[i].device))
            gc.enable()
            if t.profile:
                _profile_rounds(loaded, inputs, timed, t, s)
    finally:
        if gc_was_enabled:
            gc.enable()
    return s


def _profile_rounds(
    loaded: list[_Loaded], inputs: list[tuple[Tensor, Tensor]], timed: list[int], t: _Timing, s: _Samples
) -> None:
    for _ in range(t.throughput_repeats):
        # a package's kernels run outside the profiler's sight: no figure rather than a wrong one
        for i in (i for i in timed if loaded[i].entry["runtime"] != "aoti"):
            cpu_us, cuda_us = _profile_once(loaded[i].runnable, inputs[i][1], loaded[i].device)
            s.prof_cpu[i].append(cpu_us)
            if cuda_us is not None:
                s.prof_cuda[i].append(cuda_us)


def _timing_figures(s: _Samples, i: int, order: list[str], t: _Timing) -> dict[str, Any]:
    """Model ``i``'s medians and minima (None where it was not timed)."""
    on = i in s.latency
    lat, thr = s.latency.get(i, []), s.throughput.get(i, [])
    n_prof = len(s.prof_cpu[i]) if on else 0
    n_cuda = len(s.prof_cuda[i]) if on else 0
    return {
        "latency_repeats": t.latency_repeats if on else None,
        "latency_b1_ms": _median_ms(lat) if on else None,
        "latency_b1_ms_min": min(lat) * 1e3 if on else None,
        "throughput_batch": t.throughput_batch,
        "throughput_repeats": t.throughput_repeats if on else None,
        "batch_ms": _median_ms(thr) if on else None,
        "batch_ms_min": min(thr) * 1e3 if on else None,
        "throughput_img_s": t.throughput_batch / statistics.median(thr) if on else None,
        "warmup": t.warmup,
        "timing_order": ("interleaved rounds: " + ", ".join(order)) if on else None,
        "profile_iterations": n_prof or None,
        "self_cpu_ms_per_batch": sum(s.prof_cpu[i]) / n_prof / 1e3 if n_prof else None,
        "self_cuda_ms_per_batch": sum(s.prof_cuda[i]) / n_cuda / 1e3 if n_cuda else None,
    }


def _peak_memory(
    m: _Loaded, inputs: tuple[Tensor, Tensor], input_shape: tuple[int, ...], t: _Timing, timeout_s: float
) -> None:
    """Peak inference memory at batch 1 and at the large batch: on CUDA here, on the CPU in a subprocess."""
    a, dev, e = m.artifact, m.device, m.entry
    if dev.type == "cuda":
        e["peak_memory_b1_bytes"] = _cuda_peak(m.runnable, inputs[0], dev)
        e["peak_memory_batch_bytes"] = _cuda_peak(m.runnable, inputs[1], dev)
        e["memory_method"] = (
            "cuda, in this process after warm-up: max_memory_allocated after "
            "reset_peak_memory_stats minus memory_allocated before one forward"
        )
        return
    if a.loader_spec is None:
        e["memory_method"] = "not measured: the artifact has no loader_spec to rebuild it in a subprocess"
        return
    try:
        got = _cpu_memory(a, input_shape, [1, t.throughput_batch], t.threads, max(1, t.warmup), timeout_s)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as err:
        e["memory_error"] = str(err)[-2000:]
        e["memory_method"] = "cpu subprocess failed"
        return
    e["peak_memory_b1_bytes"] = int(got["peak_bytes"]["1"])
    e["peak_memory_batch_bytes"] = int(got["peak_bytes"][str(t.throughput_batch)])
    e["memory_method"] = got["method"]


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------


def format_table(entries: list[dict[str, Any]]) -> str:
    """A markdown table of the main figures of :func:`measure_artifacts`' entries."""

    def num(v: Any, scale: float = 1.0, digits: int = 2) -> str:
        return "–" if v is None else f"{v / scale:.{digits}f}"

    def pct(v: Any) -> str:
        return "–" if v is None else f"{100 * v:.2f}%"

    header = (
        "| model | device | params | non-zero | MMACs | file MB | gzip MB | top-1 | top-5 | latency b1 ms | "
        "img/s | self CPU ms/batch | self CUDA ms/batch | mem b1 MiB | mem batch MiB |"
    )
    rows = [header, "|---|---|" + "---:|" * 13]
    for e in entries:
        rows.append(
            "| "
            + " | ".join(
                [
                    str(e["name"]),
                    str(e["device"]),
                    "–" if e["parameters"] is None else f"{e['parameters']:,}",
                    "–" if e["nonzero_parameters"] is None else f"{e['nonzero_parameters']:,}",
                    num(e["macs_per_image"], 1e6),
                    num(e["file_bytes"], 1e6, 3),
                    num(e["file_gzip_bytes"], 1e6, 3),
                    pct(e["test_top1"]),
                    pct(e["test_top5"]),
                    num(e["latency_b1_ms"]),
                    num(e["throughput_img_s"], 1, 0),
                    num(e["self_cpu_ms_per_batch"]),
                    num(e["self_cuda_ms_per_batch"]),
                    num(e["peak_memory_b1_bytes"], 2**20),
                    num(e["peak_memory_batch_bytes"], 2**20),
                ]
            )
            + " |"
        )
    return "\n".join(rows) + "\n"
