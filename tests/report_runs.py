"""Hand-built run folders for collect's tests: real config.yaml/meta.json written by the sweep code,
stage records written as JSON by hand (the keys the stages write), no training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.rundir import RunDir
from pipeline.submit.expand import expand_sweep, read_sweep
from pipeline.submit.plan import write_run
from tests.conftest import REPO


def make_sweep(tmp_path: Path, body: str, name: str = "s") -> tuple[Path, list[RunDir]]:
    """The run folders of a sweep file ``name: <name>`` + ``body`` on the base config."""
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(f"name: {name}\nbase: [{REPO / 'configs/base.yaml'}]\n{body}")
    spec = read_sweep(spec_path)
    sweep_dir = tmp_path / "runs" / name
    runs = [write_run(sweep_dir, spec, r) for r in expand_sweep(spec, cwd=tmp_path)]
    return sweep_dir, runs


def swept(run: RunDir) -> dict[str, Any]:
    return run.read_meta()["swept"]


def train_record(status: str = "done", **figures: Any) -> dict[str, Any]:
    return {
        "status": status,
        "epochs": 3,
        "train_loss": 0.2,
        "train_acc_best": 0.9,
        "val_loss": 0.4,
        "val_acc_best": 0.85,
        "test_loss": 0.45,
        "test_acc": 0.84,
        "test_top5": 0.99,
        **figures,
    }


def history(val_accs: list[float], seconds_per_epoch: float = 10.0, loss0: float = 2.0) -> list[dict[str, float]]:
    return [
        {
            "epoch": i + 1,
            "train_loss": loss0 / (i + 1),
            "train_acc": min(1.0, acc + 0.05),
            "val_loss": loss0 / (i + 1) + 0.1,
            "val_acc": acc,
            "lr": 0.1,
            "images_per_s": 100.0,
            "elapsed_s": seconds_per_epoch * (i + 1),
        }
        for i, acc in enumerate(val_accs)
    ]


def finish(run: RunDir, train: dict[str, Any], **stages: dict[str, Any]) -> None:
    """train.json, and every later stage (method none unless given)."""
    run.write_metrics("train", train)
    for stage in ("prune", "quantize", "measure"):
        run.write_metrics(stage, stages.get(stage, {"status": "done", "method": "none"}))


def entry(
    name: str, top1: float, top5: float, params: int, nbytes: int, latency_ms: float, **more: Any
) -> dict[str, Any]:
    """One model of measure.json."""
    return {
        "name": name,
        "device": "cpu",
        "test_top1": top1,
        "test_top5": top5,
        "parameters": params,
        "nonzero_parameters": more.pop("nonzero", params),
        "file_bytes": nbytes,
        "file_gzip_bytes": more.pop("gzip", nbytes // 2),
        "latency_b1_ms": latency_ms,
        "self_cpu_ms_per_batch": more.pop("cpu_ms", 10 * latency_ms),
        "self_cuda_ms_per_batch": None,
        "peak_memory_batch_bytes": more.pop("memory", 100_000_000),
        "runtime": more.pop("runtime", "aoti" if name == "int8" else "eager"),  # int8 as measure times it
        **more,
    }
