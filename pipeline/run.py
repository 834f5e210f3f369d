"""``python -m pipeline.run RUN_DIR_OR_CONFIG [key=value ...]``: run one config in this process.

A submitted job calls :func:`pipeline.stages.runner.execute` on its run folder; ``python -m pipeline.run``
runs the same code in the foreground (what the plain sbatch scripts call). Stages run in order; each is
skipped when its ``metrics/<stage>.json`` exists and writes that file atomically when it ends.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from pipeline import console as cli
from pipeline import share
from pipeline.config import COMMAND_LINE, ConfigError, absolutize_paths, from_run_file, load_config, run_id, to_yaml
from pipeline.rundir import (
    RunDir,
    atomic_write_json,
    atomic_write_text,
    disk_error,
)
from pipeline.stages.runner import execute, unreadable_model

EXIT_PREEMPTED = 3  # stopped by a signal after saving a checkpoint: run the same command to resume


def prepare_single(config: Path, overrides: Sequence[str], out: Path) -> RunDir:
    """A run folder under ``out`` for one config file plus overrides (resumed if it exists)."""
    cfg = absolutize_paths(load_config([config], overrides), Path.cwd())
    run = RunDir(out / run_id(cfg))
    text = to_yaml(cfg)
    if not run.config.exists() or run.config.read_text() != text:
        atomic_write_text(run.config, text)
    if not run.meta.exists():
        atomic_write_json(
            run.meta,
            {"id": run.id, "sweep": out.name, "config_file": str(config), "swept": {}, "overrides": list(overrides)},
        )
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    p.add_argument("target", type=Path, help="a run folder (holding config.yaml) or a config YAML file")
    p.add_argument("overrides", nargs="*", help="key=value settings (with a config file only)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/single"),
        help="with a config file: where its run folder goes (default runs/single)",
    )
    p.add_argument(
        "--rerun",
        default=None,
        help="failed: redo the failed stage and those after it; all: "
        "start again from scratch (old results are moved to <run>/archive/, never deleted)",
    )
    args = p.parse_intermixed_args(argv)
    with cli.exit_on_config_error():
        if args.rerun is not None and args.rerun not in ("failed", "all"):
            raise ConfigError(
                COMMAND_LINE, f"'{args.rerun}' is not allowed. Allowed values: failed, all.", key="--rerun"
            )
        if args.target.is_dir():
            if args.overrides:
                raise ConfigError(
                    COMMAND_LINE,
                    "a run folder's config is fixed; pass a config file to change settings",
                    key=args.overrides[0].split("=")[0],
                )
            run = RunDir(args.target)
            if not run.config.exists():
                raise ConfigError(args.target, "not a run folder (no config.yaml)")
            from_run_file(run.config)
        else:
            run = prepare_single(args.target, args.overrides, args.out)
    if args.rerun == "all":
        run.archive()
    elif args.rerun == "failed" and run.resumable_failure() is not None:
        pass  # a failed write (full disk): its checkpoint is intact and execute resumes it
    elif args.rerun == "failed" and (stage := run.failed_stage()) is not None:
        store = run.shared_store(stage) if stage in ("train", "prune") else None
        if store is not None:  # a failed shared training or pruning: nobody can use it; kept aside
            RunDir(store).archive()
            share.take_over(store, run)
        run.archive(None if stage == "train" else stage)  # a failed training: start afresh, log included
    try:
        status = execute(run.path)
    except (OSError, ValueError) as e:
        if disk_error(e) is None and not unreadable_model(e):
            raise
        return 1  # said above, in one line, with the file: a traceback would add nothing
    cli.console().print(f"run {run.id}: [bold]{status}[/]  ({run.path})")
    return {"done": 0, "diverged": 0, "preempted": EXIT_PREEMPTED}.get(status, 1)


if __name__ == "__main__":
    sys.exit(main())
