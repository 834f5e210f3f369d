"""What a search's array task (or local job) runs: :func:`work` rebuilds the study's base config from
``<sweep>/search/search.json``, then runs :func:`pipeline.search.worker.run_worker` with a
:class:`JobRunner`, whose trials are ordinary run folders taken through their stages by
:func:`pipeline.stages.runner.execute`, with the trial's reporter installed for the training loop.

Torch-free at import (the login node hands :func:`work` to submitit); a trial's stages import torch.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline import share
from pipeline.config import Composer, Layer, flatten, tree_run_id, tree_to_yaml, unflatten
from pipeline.jobs.owner import RunBusy, RunFolderVanished
from pipeline.jobs.procs import die_with_parent
from pipeline.rundir import RunDir, atomic_write_text, read_json
from pipeline.search.figures import Outcome, outcome_from_run
from pipeline.search.files import SearchRecord, StudyPlan, read_record
from pipeline.search.reporting import EarlyStopHook, installed
from pipeline.search.spec import SearchSpec
from pipeline.search.worker import Assignment, RunFolderRunner, run_worker

log = logging.getLogger("pipeline.search")


class TrialInterrupted(Exception):
    """The trial's run stopped on a signal (time limit, preemption) after a checkpoint: the worker stops
    and its trial stays running in the study; the requeued (or resubmitted) worker resumes it."""


class JobRunner(RunFolderRunner):
    """Trials as run folders ``<sweep>/<run id>/`` (see :class:`pipeline.search.worker.TrialRunner`)."""

    def __init__(self, sweep_dir: Path, record: SearchRecord, study: StudyPlan, worker: int):
        super().__init__(sweep_dir, record.spec.objectives, list(record.spec.constraints))
        self.record, self.study, self.worker = record, study, worker
        self.composer = Composer([Layer(f"{record.sweep_file} ({study.name}: fixed settings)", flatten(study.config))])
        self.trees: dict[str, dict[str, Any]] = {}

    @property
    def spec(self) -> SearchSpec:
        return self.record.spec

    def resolve(self, params: dict[str, Any]) -> str:
        flat = self.composer.compose_flat([Layer(f"{self.spec.source} (search.params)", dict(params))])
        tree = unflatten(flat)
        run_id = tree_run_id(tree)
        self.trees[run_id] = tree
        return run_id

    def tree(self, run_id: str, params: dict[str, Any]) -> dict[str, Any]:
        if run_id not in self.trees:  # a resumed trial: its run id was resolved by an earlier instance
            self.resolve(params)
        return self.trees[run_id]

    def stores(self, run_id: str) -> dict[str, Path]:
        """Stage -> shared store (train once, compress many) of the run, as a grid sweep's run gets them:
        none with share.train false, nor for a stage the run folder already did (or began) itself."""
        tree, run = self.trees[run_id], RunDir(self.sweep_dir / run_id)
        out: dict[str, Path] = {}
        for stage in ("train", "prune"):
            if stage == "prune" and "train" not in out:
                break  # a shared pruning starts from a shared training
            if share.stage_sharing_on(tree, stage) and not share.has_own_stage(run, stage):
                out[stage] = share.stage_store(self.sweep_dir, stage, share.stage_key(tree, stage))
        return out

    def shared(self, run_id: str, params: dict[str, Any]) -> list[str]:
        self.tree(run_id, params)
        return [str(p) for p in self.stores(run_id).values()]

    def write_run(self, a: Assignment) -> RunDir:
        """config.yaml and meta.json (the sampled values are its ``swept``: collect's columns), and
        shared.json naming the shared stores of its training and pruning."""
        run = RunDir(self.sweep_dir / a.run_id)
        tree = self.tree(a.run_id, a.params)
        text = tree_to_yaml(tree)
        if not run.config.exists() or run.config.read_text() != text:
            run.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run.config, text)
        search = {"study": self.study.name, "trial": a.number, "params": a.params, "worker": self.worker}
        meta = {
            "id": a.run_id,
            "sweep": self.record.sweep,
            "sweep_file": self.record.sweep_file,
            "swept": {**self.study.fixed, **a.params},
            "search": search,
        }
        if read_json(run.meta) != meta:
            atomic_write_text(run.meta, json.dumps(meta, indent=2, default=str) + "\n")
        self.own_shared_stages(run)
        return run

    def own_shared_stages(self, run: RunDir) -> None:
        """Point the run at its shared stores and make it the owner of those not done yet: the worker
        runs a trial only while no other live worker uses one of its stores (:func:`pipeline.search.worker.
        _take_run`), so a store without a result is this trial's to make (or to resume)."""
        stores = self.stores(run.id)
        if not stores:
            return
        share.point_to_stores(run, stores)
        for stage, store in stores.items():
            record = share.store_record(store, stage)
            if record is None or share.resumable(record):
                share.take_over(store, run)

    def run(self, a: Assignment) -> Outcome:
        from pipeline.stages.runner import execute  # (torch-free at import, as this module)

        run = self.write_run(a)
        hook = EarlyStopHook(a.reporter, self.spec.objectives[0])
        try:
            with installed(hook):
                status = execute(run.path)
        except (RunBusy, RunFolderVanished):
            raise
        except Exception as e:  # recorded in the run folder by execute; the study goes on
            found = outcome_from_run(run.path, self.objectives, self.constraints)
            return found if found is not None else Outcome.failed(f"run {run.id}: {type(e).__name__}: {e}")
        if status == "preempted":
            raise TrialInterrupted(f"trial {a.number} (run {run.id}) stopped on a signal; it resumes when requeued")
        found = outcome_from_run(run.path, self.objectives, self.constraints)
        return found if found is not None else Outcome.failed(f"run {run.id} ended {status}")


def work(sweep_dir: str, study: str, worker: int) -> dict[str, Any]:
    """One worker of one study: claim, run and tell trials until there is nothing left for it."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "local" and os.environ.get("SUBMITIT_LOCAL_JOB_ID", "").isdigit():
        die_with_parent(expected_parent=int(os.environ["SUBMITIT_LOCAL_JOB_ID"]))  # as runner.execute_many
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    record = read_record(Path(sweep_dir))
    plan = record.studies[study]
    runner = JobRunner(Path(sweep_dir), record, plan, worker)
    epochs = int(plan.config["train"]["epochs"])
    try:
        summary = run_worker(record.spec, Path(sweep_dir), worker, runner, study_name=study, max_epochs=epochs)
    except TrialInterrupted as e:
        log.warning("worker %d: %s", worker, e)
        return {"worker": worker, "interrupted": str(e)}
    return {"worker": worker, "trials": summary.trials}
