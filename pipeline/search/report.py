"""A search's studies for ``status`` and ``collect``: counts and the best trial (or the Pareto front),
the trials as a table (sampled values as columns, best first), and the history and sampled-value plots.
A journal that cannot be read (garbled, missing, a database that does not answer) is one line naming it;
the run folders are shown by the commands as for any sweep. Torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline import console as cli
from pipeline.config import ConfigError
from pipeline.search.files import SearchRecord, is_search, read_record

STATE_LABELS = {"COMPLETE": "finished", "PRUNED": "stopped early", "FAIL": "failed", "RUNNING": "running"}
STATE_LABELS["WAITING"] = "to go (rerun)"


@dataclass
class StudyView:
    name: str
    summary: str  # counts, best so far and its run
    trials: list[Any] = field(default_factory=list)  # FrozenTrial, best first
    front: set[int] = field(default_factory=set)  # trial numbers on the Pareto front (several objectives)
    objectives: dict[str, str] = field(default_factory=dict)
    constraints: dict[str, Any] = field(default_factory=dict)  # figure -> spec.Bound
    problem: str = ""  # why the study could not be read


def _open(record: SearchRecord, sweep_dir: Path, name: str) -> tuple[Any, str]:
    """(study or None, what went wrong or a note about a cut record)."""
    from pipeline.search.journal import check_journal
    from pipeline.search.study import NoStudy, StorageUnreachable, journal_path, open_study

    note = ""
    try:
        if record.spec.storage is None:
            note = check_journal(journal_path(sweep_dir), repair=False).note
        return open_study(record.spec, sweep_dir, name, create=False), note
    except (ConfigError, NoStudy, StorageUnreachable, OSError) as e:
        return None, f"study {name}: cannot be read: {e}"


def _values(t: Any) -> list[float]:
    return list(t.values) if t.values is not None else []


def _feasible(t: Any) -> bool:
    return all(v <= 0 for v in t.constraints.values())


def _rank_key(t: Any, directions: list[str]) -> tuple[int, float]:
    """Finished feasible trials by their first objective, then infeasible ones, then stopped ones by
    their last reported value."""
    sign = -1.0 if directions[0] == "max" else 1.0
    if t.state.name == "COMPLETE":
        return (0 if _feasible(t) else 1), sign * t.values[0]
    if t.state.name == "PRUNED" and t.intermediate_values:
        return 2, sign * t.intermediate_values[max(t.intermediate_values)]
    return {"RUNNING": 3, "WAITING": 4}.get(t.state.name, 5), float(t.number)


def study_views(sweep_dir: Path) -> tuple[list[StudyView], list[str]]:
    """Every study of a search sweep (none for a grid), and the lines to say about unreadable ones."""
    if not is_search(sweep_dir):
        return [], []
    try:
        record = read_record(sweep_dir)
    except ConfigError as e:
        return [], [str(e)]
    from pipeline.search.study import progress

    views, notes = [], []
    directions = list(record.spec.objective.values())
    for name in record.studies:
        study, note = _open(record, sweep_dir, name)
        if note:
            notes.append(note)
        if study is None:
            continue
        p = progress(study, record.spec)
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: _rank_key(t, directions))
        front = {t.number for t in p.best} if len(directions) > 1 else set()
        view = StudyView(name, _summary(name, p, record), trials, front, dict(record.spec.objective))
        view.constraints = dict(record.spec.constraints)
        views.append(view)
    return views, notes


def _summary(name: str, p: Any, record: SearchRecord) -> str:
    c = p.counts
    line = (
        f"study {name}: {c.done} finished, {c.running} running, {c.stopped} stopped early, {c.failed} failed, "
        f"{p.to_go} to go (of {record.spec.trials})"
    )
    if not p.best:
        return line + ("; no feasible finished trial yet" if record.spec.constraints else "; no finished trial yet")
    if len(record.spec.objective) > 1:
        front = ", ".join(f"{t.number} (run {t.user_attrs.get('run_id', '?')})" for t in p.best)
        return line + f"; Pareto front: trials {front}; " + best_each(p.best, record.spec.objective)
    best = p.best[0]
    objective = next(iter(record.spec.objective))
    return (
        line
        + f"; best so far: trial {best.number}, {objective} {cli.fmt(best.values[0])}, run {best.user_attrs.get('run_id', '?')}"
    )


def best_each(front: Sequence[Any], objective: dict[str, str]) -> str:
    """Which trial is best for each objective (each one's best is on the front)."""
    parts = []
    for i, (name, direction) in enumerate(objective.items()):
        pick = max if direction == "max" else min
        t = pick(front, key=lambda t: t.values[i])
        parts.append(f"best {name}: trial {t.number} ({cli.fmt(t.values[i])})")
    return ", ".join(parts)


def trial_rows(view: StudyView) -> tuple[list[str], list[list[str]]]:
    """The trials table: number, state, sampled values, objective values, the constraints' figures and
    whether the trial is feasible (with constraints), run (best first)."""
    keys = list(dict.fromkeys(k for t in view.trials for k in t.params))
    objectives = list(view.objectives)
    bounded = [*view.constraints, "feasible"] if view.constraints else []
    headers = ["trial", "state", *keys, *objectives, *bounded, "run"] + (["Pareto front"] if view.front else [])
    rows = []
    for t in view.trials:
        state = STATE_LABELS.get(t.state.name, t.state.name.lower())
        if t.state.name == "PRUNED" and t.intermediate_values:
            state += f" (epoch {max(t.intermediate_values)})"
        if t.state.name == "FAIL" and t.user_attrs.get("failure"):
            state += f": {str(t.user_attrs['failure'])[:160]}"
        run = str(t.user_attrs.get("run_id", ""))
        if "same_as" in t.user_attrs:
            run += f" (same run as trial {t.user_attrs['same_as']})"
        values = _values(t) if t.state.name == "COMPLETE" else []
        row = [str(t.number), state, *(cli.fmt(t.params.get(k, "")) for k in keys)]
        row += [cli.fmt(values[i]) if i < len(values) else "" for i in range(len(objectives))]
        row += _constraint_cells(view, t) if view.constraints else []
        row += [run] + (["yes" if t.number in view.front else ""] if view.front else [])
        rows.append(row)
    return headers, rows


def _constraint_cells(view: StudyView, t: Any) -> list[str]:
    figures = t.user_attrs.get("constraint_figures") or {}
    cells = [cli.fmt(figures[n]) if n in figures else "" for n in view.constraints]
    judged = t.state.name == "COMPLETE" and bool(t.constraints)
    return [*cells, ("yes" if _feasible(t) else "no") if judged else ""]


def markdown(views: Sequence[StudyView], notes: Sequence[str]) -> str:
    parts = []
    for v in views:
        headers, rows = trial_rows(v)
        table = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
        table += "".join("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |\n" for row in rows)
        parts.append(f"## Search: {v.summary}\n\n{table}")
    if notes:
        parts.append("## Search problems\n\n" + "".join(f"- {n}\n" for n in notes))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def history_points(view: StudyView, hours: dict[str, float]) -> list[tuple[int, float, float]]:
    """(trial number, cumulative compute hours, best value so far) after each finished trial, in
    trial order (one objective)."""
    direction = next(iter(view.objectives.values()))
    best = -math.inf if direction == "max" else math.inf
    pick = max if direction == "max" else min
    out, spent = [], 0.0
    for t in sorted(view.trials, key=lambda t: t.number):
        spent += hours.get(str(t.user_attrs.get("run_id", "")), 0.0) if "same_as" not in t.user_attrs else 0.0
        if t.state.name == "COMPLETE":
            best = pick(best, t.values[0])
        if math.isfinite(best):
            out.append((t.number, spent, best))
    return out


def plot_study(view: StudyView, hours: dict[str, float], hours_label: str, out_dir: Path) -> list[Path]:
    """<study>_history.png (best so far vs trials and vs compute hours) and <study>_params.png (each
    sampled value against the first objective)."""
    from pipeline.report.plots import _pyplot, _save

    plt = _pyplot()
    objective = next(iter(view.objectives))
    paths = []
    points = history_points(view, hours) if len(view.objectives) == 1 else []
    if points:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        axes[0].step([p[0] for p in points], [p[2] for p in points], where="post")
        axes[0].set(xlabel="trial", ylabel=f"best {objective} so far", title=f"{view.name}: best so far")
        axes[1].step([p[1] for p in points], [p[2] for p in points], where="post")
        axes[1].set(xlabel=hours_label, ylabel=f"best {objective} so far", title="against compute")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{view.name}_history.png"))
        plt.close(fig)
    done = [t for t in view.trials if t.state.name == "COMPLETE"]
    if view.constraints and done:
        paths.append(plot_budget(view, done, out_dir))
    keys = list(dict.fromkeys(k for t in done for k in t.params))
    if done and keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            xs = [t.params[key] for t in done if key in t.params]
            ys = [t.values[0] for t in done if key in t.params]
            ax.scatter([str(x) if isinstance(x, str) else x for x in xs], ys)
            if all(isinstance(x, (int, float)) and x > 0 for x in xs) and max(xs) / min(xs) > 50:
                ax.set_xscale("log")
            ax.set(xlabel=key, ylabel=objective)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"{view.name}_params.png"))
        plt.close(fig)
    return paths


def plot_budget(view: StudyView, done: list[Any], out_dir: Path) -> Path:
    """<study>_budget.png: each constraint's figure against the first objective (int8 latency or size in
    a budget study), feasible and infeasible trials apart, the budget line(s) marked."""
    from pipeline.report.plots import _pyplot, _save

    plt = _pyplot()
    objective = next(iter(view.objectives))
    fig, axes = plt.subplots(1, len(view.constraints), figsize=(5 * len(view.constraints), 4), squeeze=False)
    for ax, (name, bound) in zip(axes[0], view.constraints.items()):
        for ok, colour, label in ((True, "tab:blue", "feasible"), (False, "tab:red", "infeasible")):
            pts = [(t.values[0], t.user_attrs["constraint_figures"][name]) for t in done
                   if _feasible(t) == ok and name in (t.user_attrs.get("constraint_figures") or {})]  # fmt: skip
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=colour, label=label)
        for limit in (bound.min, bound.max):
            if limit is not None:
                ax.axhline(limit, color="black", linestyle="--", label=f"budget {limit:g}")
        ax.set(xlabel=objective, ylabel=name, title=f"{view.name}: {name} against {objective}")
        ax.legend()
    fig.tight_layout()
    path = _save(fig, out_dir / f"{view.name}_budget.png")
    plt.close(fig)
    return path
