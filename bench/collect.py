"""collect on a large sweep: 1,000 synthetic run folders holding every stage's record.

    .venv/bin/python bench/collect.py [--runs 1000] [--repeats 3] [--keep DIR]

Writes the folders once into a temporary directory (config.yaml and meta.json by the sweep code itself,
a 5 x 10 x 10 x 2 grid of optimizer, lr, weight decay and pruning method; train.json with a 50-epoch history,
prune.json with a sparsity log, quantize.json, measure.json with three models), then times, each the
median of ``--repeats``, in one process:

- read: merely reading every file collect reads (json.loads of each record and meta.json, each
  config.yaml's text)
- tables: reading the records, building the runs table and the compression blocks, markdown, CSV and
  JSON text, the failures section (no files written, no HParams)
- plots: the four PNG files from the records already read

Ends with ``target <name>: <seconds> (goal <goal>) PASS|FAIL`` lines; exits 0 either way. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import collect as collect_cli
from pipeline.jobs.procs import cpu_name
from pipeline.report import writers
from pipeline.report.plots import plot_sweep
from pipeline.rundir import STAGES, list_runs
from pipeline.submit.expand import expand_sweep, read_sweep
from pipeline.submit.plan import write_run

REPO = Path(__file__).resolve().parents[1]
GOALS = {"tables": 2.0, "plots": 10.0}


def write_sweep(root: Path, n: int) -> Path:
    lrs = [round(0.01 * (i + 1), 3) for i in range(10)]
    wds = [round(1e-5 * (i + 1), 6) for i in range(10)]
    spec_path = root / "big.yaml"
    spec_path.write_text(
        f"name: big\nbase: [{REPO / 'configs/base.yaml'}]\nset: {{quant.method: int8, prune.sparsity: 0.5}}\n"
        f"grid: {{optim.name: [sgd, nesterov, adam, adamw, adagrad], optim.lr: {lrs}, optim.weight_decay: {wds}, "
        "prune.method: [unstructured, structured]}\n"
    )
    spec = read_sweep(spec_path)
    sweep_dir = root / "runs" / "big"
    for i, r in enumerate(expand_sweep(spec, cwd=root)[:n]):
        run = write_run(sweep_dir, spec, r)
        acc = 0.5 + 0.4 * ((i * 7919) % 1000) / 1000
        hist = [
            {
                "epoch": e + 1,
                "train_loss": 2 / (e + 1),
                "train_acc": acc * e / 50,
                "val_loss": 2.1 / (e + 1),
                "val_acc": acc * e / 50,
                "lr": 0.1,
                "images_per_s": 300.0,
                "elapsed_s": 30.0 * (e + 1),
            }
            for e in range(50)
        ]
        method = r.swept["prune.method"]
        run.write_metrics(
            "train",
            {
                "status": "done",
                "epochs": 50,
                "train_loss": 0.04,
                "train_acc_best": acc,
                "val_loss": 0.3,
                "val_acc_best": acc,
                "test_loss": 0.31,
                "test_acc": acc,
                "test_top5": 0.99,
                "train_time_s": 1500.0,
                "cpu_s": 2900.0,  # as every stage records (collect adds the CPU time column)
                "history": hist,
            },
        )
        models = [
            {
                "name": "trained",
                "test_top1": acc,
                "test_top5": 0.99,
                "parameters": 272474,
                "nonzero_parameters": 272474,
                "file_bytes": 1122489,
                "file_gzip_bytes": 1014983,
                "latency_b1_ms": 2.7,
                "self_cpu_ms_per_batch": 228.0,
                "peak_memory_batch_bytes": 104 << 20,
            }
        ]
        if method != "none":
            run.write_metrics(
                "prune",
                {
                    "status": "done",
                    "method": method,
                    "during": "finetune",
                    "sparsity": 0.5,
                    "sparsity_target": 0.5,
                    "test_acc": acc - 0.01,
                    "test_top5": 0.99,
                    "sparsity_log": [
                        {"step": s, "target": 0.5 * s / 100, "overall": 0.5 * s / 100} for s in range(1, 101)
                    ],
                },
            )
            models.append({**models[0], "name": "pruned", "test_top1": acc - 0.01, "file_bytes": 600000})
        else:
            run.write_metrics("prune", {"status": "done", "method": "none"})
        run.write_metrics("quantize", {"status": "done", "method": "int8", "test_acc": acc - 0.005, "raw": 675726})
        models.append(
            {**models[0], "name": "int8", "test_top1": acc - 0.005, "file_bytes": 675726, "latency_b1_ms": 1.9}
        )
        run.write_metrics("measure", {"status": "done", "models": models})
    return sweep_dir


def read_only(sweep_dir: Path) -> int:
    """Every file collect reads, parsed, nothing built from them: the floor collect is measured against."""
    n = 0
    for run in list_runs(sweep_dir):
        run.config.read_text()  # collect parses a config only when a value is needed from it
        json.loads(run.meta.read_text())
        for stage in STAGES:
            p = run.metrics_path(stage)
            if p.exists():
                json.loads(p.read_text())
                n += 1
    return n


def tables(sweep_dir: Path) -> collect_cli.Report:
    options = collect_cli.Options(plots=False)
    rep = collect_cli.build([sweep_dir], options)
    rep.markdown = collect_cli.render_markdown(rep, sweep_dir)
    writers.csv_text(rep.raw_runs)
    writers.to_json({"runs": rep.runs, "models": rep.models}, rep.not_finished, {})
    return rep


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--keep", type=Path, help="write the run folders here (kept) instead of a temporary folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        sweep_dir = write_sweep(root, args.runs)
        print(f"wrote {len(list_runs(sweep_dir))} run folders in {time.perf_counter() - t0:.1f} s; CPU: {cpu_name()}")
        read_s, files = timed(lambda: read_only(sweep_dir), args.repeats)
        tables_s, rep = timed(lambda: tables(sweep_dir), args.repeats)
        plots_s, pngs = timed(lambda: plot_sweep(rep.keys, rep.records, root / "plots"), args.repeats)
        print(f"read {files} records + {len(rep.records)} configs and meta files: {read_s:.2f} s")
        print(
            f"tables + CSV + JSON ({len(rep.models)} compression blocks): {tables_s:.2f} s ({tables_s / read_s:.1f}x reading)"
        )
        print(f"plots ({len(pngs)} PNG files): {plots_s:.2f} s")
        for name, seconds in (("tables", tables_s), ("plots", plots_s)):
            goal = GOALS[name]
            print(f"target {name}: {seconds:.2f} s (goal <= {goal:g} s) {'PASS' if seconds <= goal else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
