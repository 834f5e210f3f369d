"""The plan of a submission as a table: each run, what is done with it, and the stages it runs or reuses."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console

from pipeline.console import SHOWN_ROWS, fmt, print_table, short_keys
from pipeline.rundir import STAGES
from pipeline.submit.expand import SweepSpec
from pipeline.submit.plan import Decision


def print_plan(
    con: Console,
    spec: SweepSpec,
    decisions: Sequence[Decision],
    *,
    dry_run: bool = False,
    job_ids: dict[str, str] | None = None,
    cluster: str | None = None,
    show_all: bool = False,
) -> None:
    keys = list(dict.fromkeys(k for d in decisions for k in d.run.swept))
    titles = short_keys(keys)
    title = f"sweep [bold]{spec.name}[/] ({spec.path})" + (" — dry run, nothing written" if dry_run else "")
    shared = any(d.share is not None for d in decisions)
    headers = ["run id", *(titles[k] for k in keys), "action"] + (["stages"] if shared else [])
    headers += ["job id"] if job_ids is not None else []
    rows = []
    for d in decisions:
        row = [d.run.id] + [fmt(d.run.swept.get(k, "")) for k in keys]
        row.append(d.action + (f" ({d.note})" if d.note else ""))
        if shared:
            row.append(stages_text(d))
        if job_ids is not None:
            row.append(job_ids.get(d.run.id, ""))
        rows.append(row)
    print_table(con, title, headers, rows, first_style="cyan", limit=None if show_all else SHOWN_ROWS)
    con.print(f"{len(decisions)} runs")


def stages_text(d: Decision) -> str:
    """Which stages a submitted run does and which it reuses: "train (shared, 3 runs)", "reuses training
    <key>", "waits for <run> (training <key>)", then the stages it runs itself."""
    if d.action.startswith("skip"):
        return ""
    later = [s for s in STAGES if s != "train"]
    if d.from_stage not in (None, "train"):
        later = later[later.index(d.from_stage) :]
    cfg = d.run.config
    idle = {  # stages whose method is none: they record that and do nothing
        "prune": (cfg.get("prune") or {}).get("method") == "none",
        "quantize": (cfg.get("quant") or {}).get("method") == "none",
        "measure": not (cfg.get("measure") or {}).get("enabled", True),
    }
    later = [s for s in later if not idle.get(s)]
    head = d.share.describe() if d.share is not None else "train"
    if d.share_prune is not None:  # "prunes <key>" or "waits for <run> (pruning <key>)" says it all
        head += f"; {d.share_prune.describe()}"
        later = [s for s in later if s != "prune"]
    return f"{head}; runs {', '.join(later)}" if later else head
