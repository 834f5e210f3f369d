"""Run folders read into records, one per run. Never raises on a bad folder: what could not be read is
kept as a problem naming the file, and the run still gets a record (its status says what is known)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.rundir import STAGES, RunDir, list_runs

# Sections of config.yaml that only change what happens after training: runs equal in everything
# else share one training (study 3 trains the same network once per compression variant).
AFTER_TRAINING = ("prune", "quant", "measure", "slurm", "output")


@dataclass
class Record:
    run: RunDir
    sweep: str  # the sweep folder's name (a column when several sweeps are compared)
    swept: dict[str, Any]
    config: dict[str, Any]  # config.yaml as plain data; {} when unreadable (see problems)
    stages: dict[str, dict[str, Any]]  # each stage's record, {} when it has none yet
    status: str  # pending | running | done | diverged | failed (from the files alone)
    progress: dict[str, Any]
    problems: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def metrics(self) -> dict[str, Any]:
        """metrics/train.json (the training's figures)."""
        return self.stages.get("train") or {}

    def measured(self) -> list[dict[str, Any]]:
        """measure.json's entries (one per model the run made), only well-formed ones."""
        models = self.stages.get("measure", {}).get("models")
        return (
            [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]
            if isinstance(models, list)
            else []
        )

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
        """Identifies the training: the config without the sections that act after it."""
        body = {k: v for k, v in self.config.items() if k not in AFTER_TRAINING}
        return repr(sorted(_flatten(body).items())) if body else self.id


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: repr(node)}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _read_config(run: RunDir) -> tuple[dict[str, Any], str | None]:
    import yaml  # omegaconf's dependency (plain YAML: the login node needs no omegaconf resolvers here)

    try:
        data = yaml.safe_load(run.config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return {}, f"{run.config} is unreadable ({reason})"
    if not isinstance(data, dict):
        return {}, f"{run.config} is unreadable (not a mapping)"
    return data, None


def read_record(run: RunDir, sweep: str) -> Record:
    problems = []
    config, problem = _read_config(run)
    if problem:
        problems.append(problem)
    stages = {}
    for stage in STAGES:
        m = run.read_metrics(stage) or {}
        if m.get("status") == "failed" and "unreadable" in str(m.get("error", "")):
            problems.append(str(m["error"]).split(";")[0])
        stages[stage] = m
    meta = run.read_meta()
    if run.meta.exists() and not meta:
        problems.append(f"{run.meta} is unreadable (corrupt or not a mapping); swept values taken as none")
    return Record(
        run=run,
        sweep=run.path.parent.name,
        swept=dict(meta.get("swept", {})),
        config=config,
        stages=stages,
        status=run.status(),
        progress=run.read_progress(),
        problems=problems,
    )


def gather(sweep_dir: Path) -> tuple[list[str], list[Record]]:
    """(swept keys in first-seen order, one record per run sorted by swept values then id)."""
    records = [read_record(run, Path(sweep_dir).name) for run in list_runs(sweep_dir)]
    keys = list(dict.fromkeys(k for r in records for k in r.swept))
    records.sort(key=lambda r: ([sort_key(r.swept.get(k)) for k in keys], r.id))
    return keys, records


def sort_key(value: Any) -> tuple[int, Any]:
    """Numbers by value, then everything else as text (a column may mix both)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, "" if value is None else str(value))
