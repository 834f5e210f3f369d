"""One search worker process for the tests: the real worker loop (:func:`pipeline.search.worker.run_worker`)
on the real study storage, with a fake trial instead of training (no torch): a cheap function of the
sampled values, reported every epoch, written into a run folder like a run's (config.yaml,
metrics/train.json, progress) so that resuming and reading results go through the real code.

    python tests/search_fake_worker.py SWEEP_DIR SEARCH_YAML WORKER [--epochs 6] [--epoch-s 0]
        [--hang-at EPOCH] [--fail-name NAME] [--invalid-name NAME]

Prints the worker's summary as one JSON line. ``--hang-at E``: the first trial this process runs stops
before epoch E (its progress saved), writes ``<SWEEP_DIR>/hang.<pid>`` holding the trial number and
sleeps, to be killed. ``--fail-name``: trials with that optim.name fail at epoch 2 (a diverged run).
``--invalid-name``: that optim.name is refused when the run id is resolved (an invalid combination).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ConfigError, read_yaml  # noqa: E402
from pipeline.rundir import atomic_write_json, read_json  # noqa: E402
from pipeline.search.figures import STOPPED, Outcome  # noqa: E402
from pipeline.search.spec import parse_search  # noqa: E402
from pipeline.search.worker import Assignment, RunFolderRunner, run_worker  # noqa: E402

CONFIG = "data: {}\nmodel: {}\noptim: {}\ntrain: {}\n"
NAME_BONUS = {"sgd": 0.0, "nesterov": 0.02, "adam": -0.03}


def quality(params: dict[str, Any]) -> float:
    """The fake run's final accuracy: best at lr = 10^-1.5, shifted by the optimizer's name."""
    lr = float(params.get("optim.lr", 0.03))
    return 0.9 - 0.1 * (math.log10(lr) + 1.5) ** 2 + NAME_BONUS.get(str(params.get("optim.name", "sgd")), 0.0)


def epoch_acc(params: dict[str, Any], epoch: int) -> float:
    return quality(params) * (1 - 0.6**epoch)


class FakeRunner(RunFolderRunner):
    def __init__(self, sweep_dir: Path, objectives: list[str], args: argparse.Namespace):
        super().__init__(sweep_dir, objectives)
        self.args = args
        self.hung = False

    def resolve(self, params: dict[str, Any]) -> str:
        if self.args.invalid_name and params.get("optim.name") == self.args.invalid_name:
            raise ConfigError("sweep.yaml (search.params)", "refused by the schema", key="optim.name")
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]

    def run(self, a: Assignment) -> Outcome:
        run = self.sweep_dir / a.run_id
        (run / "metrics").mkdir(parents=True, exist_ok=True)
        if not (run / "config.yaml").exists():
            (run / "config.yaml").write_text(CONFIG)
        progress = read_json(run / "progress.json") or {"epoch": 0, "history": []}
        history = progress["history"]
        for epoch in range(progress["epoch"] + 1, self.args.epochs + 1):
            self._maybe_hang(run, a, epoch)
            time.sleep(self.args.epoch_s)
            with open(run / "epochs.log", "a") as f:
                f.write(f"{os.getpid()} {a.number} {epoch}\n")
            history.append({"epoch": epoch, "val_acc": epoch_acc(a.params, epoch)})
            atomic_write_json(run / "progress.json", {"epoch": epoch, "history": history})
            if self.args.fail_name and a.params.get("optim.name") == self.args.fail_name and epoch == 2:
                atomic_write_json(run / "metrics/train.json", {"status": "diverged", "error": "loss nan at epoch 2"})
                return Outcome.failed("diverged: loss nan at epoch 2")
            # as the training loop: every epoch is reported, and the last one is never stopped (it is done)
            if a.reporter.report(epoch, max(h["val_acc"] for h in history)) and epoch < self.args.epochs:
                atomic_write_json(run / "metrics/train.json", {"status": STOPPED, "epochs": epoch, "history": history})
                return Outcome.stopped(epoch)
        best = max(h["val_acc"] for h in history)
        train = {"status": "done", "val_acc_best": best, "train_time_s": 10.0 * len(history), "history": history}
        atomic_write_json(run / "metrics/train.json", train)
        for stage in ("prune", "quantize", "measure"):
            atomic_write_json(run / f"metrics/{stage}.json", {"status": "done", "method": "none"})
        return Outcome.done([float(train[name]) for name in self.objectives])

    def _maybe_hang(self, run: Path, a: Assignment, epoch: int) -> None:
        if self.args.hang_at and not self.hung and epoch == self.args.hang_at:
            self.hung = True
            (self.sweep_dir / f"hang.{os.getpid()}").write_text(f"{a.number} {a.run_id}\n")
            time.sleep(3600)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("search_yaml", type=Path)
    p.add_argument("worker", type=int)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--epoch-s", type=float, default=0.0)
    p.add_argument("--hang-at", type=int, default=0)
    p.add_argument("--fail-name", default="")
    p.add_argument("--invalid-name", default="")
    p.add_argument("--poll-s", type=float, default=0.2)
    args = p.parse_args()
    spec = parse_search(read_yaml(args.search_yaml)["search"], args.search_yaml)
    runner = FakeRunner(args.sweep_dir, spec.objectives, args)
    summary = run_worker(spec, args.sweep_dir, args.worker, runner, max_epochs=args.epochs, poll_s=args.poll_s)
    print(json.dumps({"worker": summary.worker, "trials": summary.trials, "pid": os.getpid()}), flush=True)


if __name__ == "__main__":
    main()
