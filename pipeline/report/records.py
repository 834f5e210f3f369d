"""Run folders read into records, one per run. Never raises on a bad folder: what could not be read is
kept as a problem naming the file, and the run still gets a record (its status says what is known)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.rundir import STAGES, UNREADABLE_OUTPUT, RunDir, config_sections, reading_once, survey

# Sections of config.yaml that only change what happens after training: runs equal in everything
# else share one training (study 3 trains the same network once per compression variant).
AFTER_TRAINING = ("prune", "quant", "measure", "slurm", "output")


@dataclass
class Record:
    run: RunDir
    sweep: str  # the sweep folder's name (a column when several sweeps are compared)
    swept: dict[str, Any]
    config_text: str  # config.yaml as written ("" when unreadable: see problems)
    stages: dict[str, dict[str, Any]]  # each stage's record, {} when it has none yet
    status: str  # pending | running | done | diverged | failed (from the files alone)
    progress: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    _config: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics/train.json (the training's figures)."""
        return self.stages.get("train") or {}

    @property
    def config(self) -> dict[str, Any]:
        """config.yaml as plain data, parsed on first use (YAML is most of the cost of reading a large
        sweep, and most tables need only the swept values); {} when it cannot be parsed."""
        if self._config is None:
            self._config = {}
            if self.config_text:
                data, problem = _parse_config(self.run, self.config_text)
                self._config = data
                if problem:
                    self.problems.append(problem)
        return self._config

    def measured(self) -> list[dict[str, Any]]:
        """measure.json's entries (one per model the run made), only well-formed ones."""
        models = self.stages.get("measure", {}).get("models")
        if not isinstance(models, list):
            return []
        return [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A dotted key of the resolved config (swept values win: they are what the sweep varied)."""
        if dotted in self.swept:
            return self.swept[dotted]
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def training_key(self) -> str:
        """Identifies the training: config.yaml without the sections that act after it (compared as
        text, section by section: the sweep writes every config the same way)."""
        sections = config_sections(self.config_text)
        # pruning while training (study 2) is part of the training: its schedule shapes the weights
        during_train = re.search(r"^\s+during:\s*train\s*$", sections.get("prune", ""), re.M) is not None
        body = [(k, v) for k, v in sections.items() if k not in AFTER_TRAINING or (k == "prune" and during_train)]
        return repr(sorted(body)) if body else self.id

    def status_from_stages(self) -> str:
        """What RunDir.status() says, from the records already read (no second read of every file)."""
        final = self.stages.get(list(STAGES)[-1]) or {}
        for i, stage in enumerate(STAGES):
            m = self.stages.get(stage)
            if not m:
                return "running" if i > 0 or self.run.progress.exists() else "pending"
            if m.get(UNREADABLE_OUTPUT) and final.get("status") == "done":
                continue  # a model file it made went bad after the run had finished: the run stays done
            if m.get("status") != "done":
                if stage in ("train", "prune") and m.get("status") == "failed" and self.run.blocked_by() is not None:
                    return "blocked"  # a shared training or pruning (pipeline.share) that failed in another run
                return str(m.get("status", "failed"))
        return "done"


def _parse_config(run: RunDir, text: str) -> tuple[dict[str, Any], str | None]:
    import yaml  # omegaconf's dependency (plain YAML: the login node needs no omegaconf resolvers here)

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where it is installed
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {}, f"{run.config} is unreadable ({reason})"
    if not isinstance(data, dict):
        return {}, f"{run.config} is unreadable (not a mapping)"
    return data, None


def read_record(run: RunDir, sweep: str) -> Record:
    with reading_once():  # (the records, then the check of every file: each read once)
        return _read_record(run, sweep)


def _read_record(run: RunDir, sweep: str) -> Record:
    text, problem = run.read_config_text()
    record = Record(
        run=run,
        sweep=sweep,
        swept=dict(run.read_meta()["swept"]),
        config_text=text,
        stages={stage: run.read_metrics(stage) or {} for stage in STAGES},
        status="",
        progress=run.read_progress(),
        problems=[p for p in (problem, *run.problems(config=False)) if p],
    )
    record.status = record.status_from_stages()
    return record


def gather(sweep_dir: Path, label: str | None = None) -> tuple[list[str], list[Record]]:
    """(swept keys in first-seen order, one record per run sorted by swept values then id). ``label``
    names the sweep in a comparison (default: the folder's name). Folders that are no runs
    (:func:`pipeline.rundir.survey`) are left out."""
    records = [read_record(run, label or Path(sweep_dir).name) for run in survey(sweep_dir)[0]]
    keys = list(dict.fromkeys(k for r in records for k in r.swept))
    records.sort(key=lambda r: ([sort_key(r.swept.get(k)) for k in keys], r.id))
    return keys, records


def sweep_labels(sweep_dirs: Sequence[Path]) -> list[str]:
    """A name per results folder for a comparison: its folder name, or as many of its last path parts as
    tell it apart from the others (runs_a/optimizers and runs_b/optimizers, not optimizers twice)."""
    parts = [Path(d).resolve().parts for d in sweep_dirs]
    labels = []
    for i, p in enumerate(parts):
        n = 1
        while n < len(p) and any(q[-n:] == p[-n:] for j, q in enumerate(parts) if j != i):
            n += 1
        labels.append("/".join(p[-n:]))
    return labels


def sort_key(value: Any) -> tuple[int, Any]:
    """Numbers by value, then everything else as text (a column may mix both)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, "" if value is None else str(value))
