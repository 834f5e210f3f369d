"""``python -m pipeline.collect <out>/<sweep> [<out>/<other sweep> ...]``: a sweep's results, from the
run folders alone. Torch-free.

Writes into the sweep folder (or next to ``--out FILE.md``):

- ``results.md``: the runs table (one row per run: swept values, losses, accuracies, the compression
  key figures when the sweep compresses, time, status; best values bold; seeds as mean ± std), then,
  when some run prunes or quantizes, one block per training with every model it made (parameters,
  size, top-1/top-5 error with the change from the base, memory, latency, CPU/CUDA time, reduction
  factors), then every run that is not done with its reason, then the plots
- ``results.csv`` (one row per run, full keys, raw numbers), ``models.csv`` (one row per model),
  ``results.json`` (all of it)
- ``plots/*.png`` (``--no-plots`` skips them) and TensorBoard HParams in each run's tb/ folder
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline import console as cli
from pipeline.config import COMMAND_LINE, ConfigError
from pipeline.report import tables as tb
from pipeline.report import writers
from pipeline.report.failures import Failure, failures
from pipeline.report.records import Record, gather, sweep_labels
from pipeline.rundir import atomic_write_text, survey

TABLE_SHAPES = ("auto", "runs", "models")


@dataclass
class Options:
    table: str = "auto"  # auto: the models blocks too when some run prunes or quantizes
    flat: bool = False  # models: one table of every model instead of one block per training
    group_by: str | None = None
    sort: str | None = None
    reverse: bool = False
    columns: list[str] | None = None
    target_acc: float | None = None  # 0-1: a "time to N%" column from the per-epoch history
    seeds: bool = True  # average runs that differ only in train.seed
    plots: bool = True
    hparams: bool = True


@dataclass
class Report:
    keys: list[str]
    records: list[Record]
    runs: list[tb.Table]
    models: list[tb.Table]
    raw_runs: tb.Table  # one row per run, never averaged or grouped: the CSV
    not_finished: list[Failure]
    problems: list[str] = field(default_factory=list)  # unreadable files of the sweeps themselves (not of one run)
    plots: list[Path] = field(default_factory=list)
    markdown: str = ""
    studies: list[Any] = field(default_factory=list)  # a search's studies (pipeline.search.report.StudyView)


def _check(options: Options, keys: list[str], runs: tb.Table) -> None:
    """Bad flags stop before anything is written: the flag, the value and what is allowed."""
    if options.table not in TABLE_SHAPES:
        raise ConfigError(
            COMMAND_LINE, f"'{options.table}' is not allowed. Allowed values: {', '.join(TABLE_SHAPES)}.", key="--table"
        )
    if options.group_by is not None and options.group_by not in keys:
        allowed = ", ".join(keys) or "none (this sweep sweeps no key)"
        raise ConfigError(
            COMMAND_LINE, f"'{options.group_by}' is not a swept key. Allowed values: {allowed}.", key="--group-by"
        )
    names = [c.title for c in runs.columns]
    for flag, wanted in (("--sort", [options.sort] if options.sort else []), ("--columns", options.columns or [])):
        for name in wanted:
            if runs.column(name) is None:
                raise ConfigError(
                    COMMAND_LINE, f"'{name}' is not a column. Allowed values: {', '.join(names)}.", key=flag
                )
    if options.target_acc is not None and not 0 < options.target_acc <= 1:
        raise ConfigError(
            COMMAND_LINE, f"{options.target_acc} is out of range: a fraction in (0, 1], e.g. 0.94.", key="--target-acc"
        )


def build(sweep_dirs: Sequence[Path], options: Options) -> Report:
    """Read every run folder and build the tables (nothing written)."""
    keys: list[str] = []
    records: list[Record] = []
    for d, label in zip(sweep_dirs, sweep_labels(sweep_dirs)):
        k, r = gather(d, label)
        keys += [x for x in k if x not in keys]
        records += r
    several = len(sweep_dirs) > 1
    runs = tb.runs_table(keys, records, sweep_column=several, target_acc=options.target_acc, seeds=options.seeds)
    _check(options, keys, runs)
    raw = tb.runs_table(keys, records, sweep_column=several, target_acc=options.target_acc, seeds=False)
    if options.sort:
        tb.sort_rows(runs, options.sort, options.reverse)
    if options.columns:
        runs = tb.select_columns(runs, options.columns)
    run_tables = tb.group_tables(runs, options.group_by) if options.group_by else [runs]
    shape = options.table
    if shape == "auto":
        shape = "models" if tb.compresses(records) else "runs"
    models = (
        [tb.drop_empty_columns(t) for t in tb.model_tables(keys, records, flat=options.flat)]
        if shape == "models"
        else []
    )
    not_finished: list[Failure] = []
    problems: list[str] = []
    for d in sweep_dirs:
        items, found = failures(d, [r for r in records if r.run.path.parent == Path(d)])
        not_finished += items
        problems += found
    from pipeline.search.report import study_views

    studies = []
    for d in sweep_dirs:
        views, notes = study_views(d)
        studies += views
        problems += notes
    return Report(keys, records, run_tables, models, raw, not_finished, problems, studies=studies)


@dataclass
class _Times:
    """Totals for :func:`_time_line`, added run by run."""

    wall: float = 0.0  # s of training and fine-tunes
    gpu: float = 0.0  # GPU s: wall time x GPUs
    cpu: float = 0.0  # CPU s of every stage
    runs: int = 0  # runs with some timed training
    # stage -> its shared store -> runs using it
    shared: dict[str, dict[Path, int]] = field(default_factory=lambda: {"train": {}, "prune": {}})

    def add(self, r: Record) -> None:
        timed = [self._add_stage(r, stage, m) for stage, m in r.stages.items()]
        self.runs += any(timed)

    def _add_stage(self, r: Record, stage: str, m: dict[str, Any]) -> bool:
        """Count one stage of ``r`` (a shared one with the first run that uses it); whether it was timed."""
        store = r.run.shared_store(stage) if stage in self.shared else None
        first_use = True
        if store is not None:
            uses = self.shared[stage][store] = self.shared[stage].get(store, 0) + 1
            first_use = uses == 1
        if first_use and (seconds := tb.number(m.get("cpu_s"))) is not None:
            self.cpu += seconds
        timed = False
        for key in ("train_time_s", "qat_train_time_s"):
            seconds = tb.number(m.get(key))
            if seconds is None:
                continue
            timed = True
            if first_use:  # else counted with the first run that shares it
                self.wall += seconds
                if str(r.metrics.get("device", "")).startswith("cuda"):
                    self.gpu += seconds * int(r.metrics.get("world_size") or 1)
        return timed


def _time_line(records: Sequence[Record]) -> str:
    """The sweep's total wall time of training and fine-tunes, GPU time (wall time x GPUs) and CPU time
    of all stages. A training or pruning that several runs share (pipeline.share) is counted once."""
    t = _Times()
    for r in records:
        t.add(r)
    if not t.runs:
        return ""
    line = f"Training time (train and fine-tunes): {cli.hms(t.wall)} over {t.runs} run(s)"
    for stage, what in (("train", "training(s)"), ("prune", "pruning(s)")):
        if t.shared[stage]:
            line += f"; {len(t.shared[stage])} {what} shared by {sum(t.shared[stage].values())} runs"
    if t.shared["train"] or t.shared["prune"]:
        line += ", each counted once"
    line += f", GPU time {cli.hms(t.gpu)}" if t.gpu else ", on CPUs"
    return line + (f"; CPU time of every stage {cli.hms(t.cpu)}" if t.cpu else "") + "."


def render_markdown(rep: Report, plot_base: Path | None = None) -> str:
    several = len({r.sweep for r in rep.records}) > 1
    parts = [writers.markdown(t) for t in rep.runs]
    time_line = _time_line(rep.records)
    if time_line:
        parts.append(time_line + "\n")
    if rep.studies:
        from pipeline.search.report import markdown

        parts.append(markdown(rep.studies, []))
    if rep.models:
        parts.append("## Models\n\n" + "\n".join(writers.markdown(t) for t in rep.models))
    if rep.not_finished:
        parts.append(writers.failures_markdown(rep.not_finished, sweep_column=several))
    if rep.problems:
        parts.append(writers.problems_markdown(rep.problems))
    if rep.plots:
        base = plot_base or Path(".")
        links = [f"![{p.stem}]({os.path.relpath(p, base)})" for p in rep.plots]
        parts.append("## Plots\n\n" + "\n".join(links) + "\n")
    return "\n".join(parts)


def write(rep: Report, md_path: Path, options: Options) -> dict[str, Path]:
    """Every output file next to ``md_path`` (plots in a plots/ folder beside it)."""
    folder = md_path.parent
    stem = md_path.stem
    if options.plots:
        from pipeline.report.plots import plot_sweep

        plot_dir = folder / ("plots" if stem == "results" else f"{stem}_plots")
        try:
            rep.plots = plot_sweep(rep.keys, rep.records, plot_dir) + _study_plots(rep, plot_dir)
        except OSError:
            raise  # a folder that refuses writes: reported like the tables' (path, reason, exit 2)
        except Exception as e:  # noqa: BLE001 - odd values in some run's records: the tables still come
            print(f"warning: plots not written ({type(e).__name__}: {e})", file=sys.stderr)
    rep.markdown = render_markdown(rep, folder)
    out = {"md": md_path, "csv": folder / f"{stem}.csv", "json": folder / f"{stem}.json"}
    atomic_write_text(out["md"], rep.markdown)
    atomic_write_text(out["csv"], writers.csv_text(rep.raw_runs))
    if rep.models:
        out["models_csv"] = folder / f"{'models' if stem == 'results' else stem + '_models'}.csv"
        flat = tb.model_tables(rep.keys, rep.records, flat=True)
        atomic_write_text(out["models_csv"], writers.csv_text(flat[0]) if flat else "")
    extra: dict[str, Any] = {"swept_keys": rep.keys, "plots": [str(p) for p in rep.plots], "problems": rep.problems}
    atomic_write_text(out["json"], writers.to_json({"runs": rep.runs, "models": rep.models}, rep.not_finished, extra))
    return out


def _study_plots(rep: Report, plot_dir: Path) -> list[Path]:
    """A search's history (against trials and compute hours) and sampled values against the objective."""
    if not rep.studies:
        return []
    from pipeline.search.report import plot_study

    gpu = {r.id: s / 3600 for r in rep.records if (s := tb.gpu_seconds(r)) is not None}
    hours, label = (
        (gpu, "GPU hours") if gpu else ({r.id: (tb.cpu_seconds(r) or 0.0) / 3600 for r in rep.records}, "CPU hours")
    )
    return [p for v in rep.studies for p in plot_study(v, hours, label, plot_dir)]


def _hparams(sweep_dir: Path, rep: Report) -> None:
    from pipeline.report.hparams import write_hparams

    records = [r for r in rep.records if r.run.path.parent == Path(sweep_dir)]
    keys = list(dict.fromkeys(k for r in records for k in r.swept))
    try:
        write_hparams(sweep_dir, keys, records)  # after the tables: they never wait on TensorBoard
    except ImportError as e:  # tensorboard missing: only the optional TensorBoard view is lost
        print(f"warning: no TensorBoard HParams written ({e})", file=sys.stderr)


def collect(sweep_dir: Path, options: Options | None = None) -> tuple[str, str]:
    """Write results.md, results.csv, results.json (and models.csv, plots) into the sweep folder and
    the HParams into each run; returns (markdown, csv) text."""
    options = options or Options()
    rep = build([Path(sweep_dir)], options)
    files = write(rep, Path(sweep_dir) / "results.md", options)
    if options.hparams:
        _hparams(Path(sweep_dir), rep)
    return rep.markdown, files["csv"].read_text()


def _print(con: Any, rep: Report, rich: bool) -> None:
    if not rich:
        con.print(rep.markdown, markup=False, highlight=False, soft_wrap=True)
        return
    for t in rep.runs:
        con.print(writers.rich_table(t))
    if line := _time_line(rep.records):
        con.print(line, markup=False)
    for t in rep.models:
        con.print(writers.rich_table(t))
    if rep.not_finished:
        con.print(writers.failures_markdown(rep.not_finished), markup=False, highlight=False, soft_wrap=True)
    if rep.studies:
        from pipeline.search.report import markdown

        con.print(markdown(rep.studies, []), markup=False, highlight=False, soft_wrap=True)
    if rep.problems:
        con.print(writers.problems_markdown(rep.problems), markup=False, highlight=False, soft_wrap=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.collect", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "sweep_dirs", type=Path, nargs="+", metavar="SWEEP_DIR", help="results folders, e.g. runs/optimizers"
    )
    p.add_argument("--out", type=Path, help="write FILE.md (and FILE.csv, FILE.json, FILE_plots/) here instead")
    p.add_argument(
        "--table",
        default="auto",
        help="runs, models (one block per training), or auto (models too when the sweep compresses)",
    )
    p.add_argument("--flat", action="store_true", help="models: one row per model in one table")
    p.add_argument("--group-by", metavar="KEY", help="one runs table per value of this swept key")
    p.add_argument("--sort", metavar="COLUMN", help="sort the runs by a column (title or key), best first")
    p.add_argument("--reverse", action="store_true", help="with --sort: the other way round")
    p.add_argument("--columns", metavar="A,B,...", help="only these columns of the runs table (titles or keys)")
    p.add_argument(
        "--target-acc", type=float, metavar="FRACTION", help="add the training time until val acc first reached it"
    )
    p.add_argument("--per-seed", action="store_true", help="one row per seed (no mean ± std)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--format",
        choices=("auto", "markdown", "rich"),
        default="auto",
        help="terminal output (auto: rich on a terminal)",
    )
    return p


def _options(args: argparse.Namespace) -> Options:
    return Options(
        table=args.table,
        flat=args.flat,
        group_by=args.group_by,
        sort=args.sort,
        reverse=args.reverse,
        columns=[c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None,
        target_acc=args.target_acc,
        seeds=not args.per_seed,
        plots=not args.no_plots,
    )


def _check_args(args: argparse.Namespace) -> None:
    """Each SWEEP_DIR a folder with run folders, named once; ``--out`` a .md file (else ConfigError)."""
    for d in args.sweep_dirs:
        if not d.is_dir():
            raise ConfigError(COMMAND_LINE, f"'{d}' is not a folder", key="sweep_dir")
        runs, strays = survey(d)
        if not runs:
            raise ConfigError(d, "holds no run folders (*/config.yaml)" + "".join(f"; {x}" for x in strays[:3]))
    seen: dict[Path, Path] = {}
    for d in args.sweep_dirs:
        if (first := seen.setdefault(d.resolve(), d)) is not d:
            raise ConfigError(
                COMMAND_LINE, f"'{d}' is the same folder as '{first}': name each sweep once", key="sweep_dir"
            )
    if args.out is not None and args.out.suffix != ".md":
        raise ConfigError(COMMAND_LINE, f"'{args.out}' must be a markdown file name ending in .md", key="--out")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = _options(args)
    con = cli.console()
    with cli.exit_on_config_error():
        _check_args(args)
        rep = build(args.sweep_dirs, options)
    md_path = args.out or args.sweep_dirs[0] / "results.md"
    if len(args.sweep_dirs) > 1 and args.out is None:
        md_path = Path("comparison.md")
    with cli.exit_on_os_error():  # a read-only or full results folder: the path and the reason, exit 2
        files = write(rep, md_path, options)
        if options.hparams:
            for d in args.sweep_dirs:
                _hparams(d, rep)
    rich = args.format == "rich" or (args.format == "auto" and con.is_terminal)
    _print(con, rep, rich)
    con.print("wrote " + ", ".join(str(f) for f in files.values()), markup=False, highlight=False, soft_wrap=True)
    if rep.plots:
        con.print(f"plots: {', '.join(str(p) for p in rep.plots)}", markup=False, highlight=False, soft_wrap=True)
    _print_tensorboard_hint(con, args.sweep_dirs)
    return 0


def _print_tensorboard_hint(con: Any, sweep_dirs: Sequence[Path]) -> None:
    """How many runs have HParams, and the tensorboard command that shows them (nothing when none has)."""
    from pipeline.report.hparams import HPARAMS_FILE

    runs = [r for d in sweep_dirs for r in survey(d)[0]]
    n = sum((r.tensorboard / HPARAMS_FILE).is_file() for r in runs)
    if not n:
        return
    if len(sweep_dirs) == 1:
        logdirs = f"--logdir {sweep_dirs[0]}"
    else:  # one HParams experiment per sweep: TensorBoard's named log folders
        labels = sweep_labels(sweep_dirs)
        logdirs = "--logdir_spec " + ",".join(f"{n}:{d}" for n, d in zip(labels, sweep_dirs))
    con.print(
        f"HParams of {n}/{len(runs)} runs in <run>/tb/{HPARAMS_FILE}: tensorboard "
        f"{logdirs} (restart a running TensorBoard to see changes)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


if __name__ == "__main__":
    sys.exit(main())
