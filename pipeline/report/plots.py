"""Plots of a sweep as PNG files under ``<sweep>/plots/``: accuracy against model size and against
latency (Pareto front marked, points labelled), learning curves coloured by the swept value, and
sparsity over training steps (target against measured).

Each plot is two steps: a ``*_series`` function returns exactly the data handed to matplotlib (tested
directly), and ``render_*`` draws it. matplotlib is imported only in ``render_*``, with the Agg
backend (no display on a login node)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline import console as cli
from pipeline.report.budget import budget_panels
from pipeline.report.records import AFTER_TRAINING, Record
from pipeline.report.tables import model_rows, number

FIGSIZE = (8.0, 5.0)  # inches
DPI = 100  # -> 800 x 500 pixels, readable on a slide
MAX_LABELS = 24  # point labels and legend entries beyond this are unreadable (and slow to lay out)


@dataclass
class Point:
    label: str
    x: float
    y: float
    run: str


@dataclass
class Curve:
    label: str
    colour_value: Any  # the swept value the colour stands for
    x: list[float]
    y: list[float]
    extra: dict[str, list[float]] = field(default_factory=dict)


def pareto_front(points: Sequence[Point], x_better: str = "min") -> list[int]:
    """Indices of the points no other point beats (smaller x, or larger with ``x_better="max"``, and
    higher y; at least as good in both), sorted by x."""
    sign = -1.0 if x_better == "max" else 1.0
    front = []
    for i, p in enumerate(points):
        dominated = any(
            (sign * q.x <= sign * p.x and q.y >= p.y) and (q.x != p.x or q.y > p.y)
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i].x, -points[i].y))


def _speed_ups(rows: list[dict[str, Any]]) -> None:
    """``speed_factor`` of each row of one run: the batch-1 latency of the run's base model over the
    row's own (both timed in the run's own job; the base is 1)."""
    base = next((number(row.get("latency_b1_ms")) for row in rows if row["name"] == "trained"), None)
    for row in rows:
        latency = number(row.get("latency_b1_ms"))
        row["speed_factor"] = base / latency if base and latency else None


def accuracy_series(records: Sequence[Record], x_key: str) -> list[Point]:
    """Every measured model of the sweep's finished runs: test top-1 accuracy (%) against ``x_key``
    ('file_bytes' in MB, 'latency_b1_ms' in ms, or 'speed_factor': the speed-up over the base model timed
    in the same job, which is what compares across jobs). A training shared by several runs is one point."""
    points: list[Point] = []
    bases: set[str] = set()
    for r in records:
        if r.status != "done":
            continue
        described = ", ".join(cli.fmt(v) for k, v in r.swept.items() if k != "train.seed" and _training(k))
        rows = model_rows(r)
        _speed_ups(rows)
        for row in rows:
            x, top1 = number(row.get(x_key)), number(row.get("top1"))
            if x is None or top1 is None:
                continue
            if row["name"] == "trained":
                if r.training_key() in bases:  # one training, measured again by each of its runs
                    continue
                bases.add(r.training_key())
            label = f"base ({described})" if row["name"] == "trained" and described else row["model"]
            if row["name"] != "trained" and described:
                label = f"{label} ({described})"
            points.append(Point(label, x / 1e6 if x_key == "file_bytes" else x, 100 * top1, r.id))
    return points


def _training(key: str) -> bool:
    """A swept key that changes the training (not only what happens after it)."""
    return key.split(".")[0] not in AFTER_TRAINING


def colour_key(keys: Sequence[str], records: Sequence[Record]) -> str | None:
    """The swept key the curves are coloured by: the first one whose value differs between runs."""
    for k in keys:
        if len({repr(r.swept.get(k)) for r in records}) > 1:
            return k
    return None


def learning_series(keys: Sequence[str], records: Sequence[Record]) -> tuple[str | None, list[Curve]]:
    """Per run with a per-epoch history in metrics/train.json: validation accuracy (%) per epoch, with
    train accuracy and both losses in ``extra``; labelled by the swept values."""
    keys = [k for k in keys if _training(k)]
    by = colour_key(keys, records)
    titles = cli.short_keys(list(keys))
    curves = []
    trainings: set[str] = set()
    for r in records:
        history = [h for h in r.metrics.get("history") or [] if isinstance(h, dict) and "epoch" in h]
        if not history or r.training_key() in trainings:  # a shared training is drawn once
            continue
        trainings.add(r.training_key())
        label = ", ".join(f"{titles[k]}={cli.fmt(r.swept[k])}" for k in keys if k in r.swept) or r.id
        epochs = [_float(h["epoch"]) for h in history]
        extra = {
            key: [(100 if "acc" in key else 1) * _float(h.get(key)) for h in history]
            for key in ("train_acc", "train_loss", "val_loss")
        }
        val = [100 * _float(h.get("val_acc")) for h in history]
        curves.append(Curve(label, r.swept.get(by) if by else None, epochs, val, extra))
    return by, curves


def _float(value: Any) -> float:
    """A plotted value: NaN (a gap in the line) for anything that is not a finite number."""
    n = number(value)
    return float("nan") if n is None else n


def sparsity_series(records: Sequence[Record]) -> list[Curve]:
    """Per pruning run: the scheduled target sparsity (%) by optimizer step, and what was measured
    (``extra['measured']``), from the ``sparsity_log`` of metrics/train.json or prune.json."""
    curves = []
    for r in records:
        for stage in ("train", "prune"):
            log = [e for e in r.stages.get(stage, {}).get("sparsity_log") or [] if isinstance(e, dict) and "step" in e]
            if not log:
                continue
            label = (
                f"{r.id} ({stage})"
                if not r.swept
                else ", ".join(f"{k.split('.')[-1]}={cli.fmt(v)}" for k, v in r.swept.items())
            )
            curves.append(
                Curve(
                    label,
                    stage,
                    [_float(e["step"]) for e in log],
                    [100 * _float(e.get("target")) for e in log],
                    {"measured": [100 * _float(e.get("overall")) for e in log]},
                )
            )
    return curves


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=DPI, format="png")  # fixed size: no bbox_inches='tight'
    tmp.replace(path)
    return path


def label_offsets(points: Sequence[Point]) -> list[tuple[int, int]]:
    """Where each label goes (points from its point): above right, or below right when a label already
    placed above right sits close to the left at the same height (they would overlap)."""
    if not points:
        return []
    xs, ys = [p.x for p in points], [p.y for p in points]
    width, height = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, int]] = []
    out: list[tuple[int, int]] = [(6, 4)] * len(points)
    for i in sorted(range(len(points)), key=lambda i: points[i].x):  # left to right
        p = points[i]
        clash = any(abs(p.y - y) < 0.04 * height and 0 <= p.x - x < 0.3 * width and dy > 0 for x, y, dy in placed)
        out[i] = (6, -12) if clash else (6, 4)
        placed.append((p.x, p.y, out[i][1]))
    return out


def render_accuracy(points: Sequence[Point], xlabel: str, title: str, path: Path, x_better: str = "min") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    front = pareto_front(points, x_better)
    ax.scatter([p.x for p in points], [p.y for p in points], s=36, color="tab:blue", label="models", zorder=3)
    ax.plot(
        [points[i].x for i in front],
        [points[i].y for i in front],
        color="tab:red",
        marker="o",
        markerfacecolor="none",
        markersize=11,
        label="Pareto front",
        zorder=2,
    )
    # every point labelled while that stays readable; in a large sweep only the front's points
    labelled = range(len(points)) if len(points) <= MAX_LABELS else front[:MAX_LABELS]
    for p, offset in zip([points[i] for i in labelled], label_offsets([points[i] for i in labelled])):
        ax.annotate(p.label, (p.x, p.y), textcoords="offset points", xytext=offset, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy, top-1 (%)")
    ax.ticklabel_format(useOffset=False)  # plain percentages, never "+9.1e1"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def _colours(curves: Sequence[Curve]) -> list[Any]:
    plt = _pyplot()
    values = [c.colour_value for c in curves]
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numeric and len(numeric) == len(values) and len(set(numeric)) > 1:
        lo, hi = min(numeric), max(numeric)
        cmap = plt.get_cmap("viridis")
        return [cmap(0.9 * (v - lo) / (hi - lo)) for v in numeric]
    order = list(dict.fromkeys(repr(v) for v in values))
    cmap = plt.get_cmap("tab10")
    return [cmap(order.index(repr(v)) % 10) for v in values]


def _colourbar(fig: Any, ax: Any, curves: Sequence[Curve], by: str | None) -> None:
    values = [c.colour_value for c in curves]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) > 1:
        plt = _pyplot()
        lo, hi = min(values), max(values)
        norm = plt.Normalize(lo, lo + (hi - lo) / 0.9)  # _colours uses 0-0.9 of viridis
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label=by)


def render_learning(by: str | None, curves: Sequence[Curve], path: Path) -> Path:
    plt = _pyplot()
    fig, (acc, loss) = plt.subplots(1, 2, figsize=FIGSIZE)
    for c, colour in zip(curves, _colours(curves)):
        acc.plot(c.x, c.y, color=colour, label=c.label)
        acc.plot(c.x, c.extra["train_acc"], color=colour, linestyle="--")
        loss.plot(c.x, c.extra["val_loss"], color=colour)
        loss.plot(c.x, c.extra["train_loss"], color=colour, linestyle="--")
    acc.set_xlabel("epoch")
    acc.set_ylabel("accuracy (%)  — val, -- train")
    loss.set_xlabel("epoch")
    loss.set_ylabel("loss  — val, -- train")
    for ax in (acc, loss):
        ax.grid(alpha=0.3)
    if len(curves) <= MAX_LABELS:
        acc.legend(title=by, fontsize=8, loc="lower right")
    else:  # too many runs for a legend: the colour scale tells the swept value
        _colourbar(fig, acc, curves, by)
    fig.suptitle("learning curves" + (f", coloured by {by}" if by else ""))
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def render_sparsity(curves: Sequence[Curve], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for c, colour in zip(curves, _colours([Curve(c.label, c.label, [], []) for c in curves])):
        ax.plot(c.x, c.y, color=colour, linestyle="--", marker="x", label=f"{c.label}: target")
        ax.plot(c.x, c.extra["measured"], color=colour, marker=".", linestyle="none", label=f"{c.label}: measured")
    if len(curves) <= MAX_LABELS // 2:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weights pruned (%)")
    ax.set_ylim(0, 100)  # the whole range: a one-shot schedule is one point, not a zoomed offset axis
    ax.set_title("sparsity over training: schedule against measured")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = _save(fig, path)
    plt.close(fig)
    return path


def render_budget(r: Record, path: Path) -> Path | None:
    """Validation top-1 of every attempt (numbered) against MACs (structured), sparsity (unstructured) or
    layers kept in fp32 (int8), the budget line, the chosen attempt and the uniform comparison."""
    panels = budget_panels(r)
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(FIGSIZE[0] * len(panels), FIGSIZE[1]), squeeze=False)
    for ax, p in zip(axes[0], panels):
        pts = p["points"]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o", color="tab:blue", label="attempts")
        for k, (x, y) in enumerate(pts):
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if isinstance(p["chosen"], int) and 0 <= p["chosen"] < len(pts):
            ax.plot(*pts[p["chosen"]], "*", markersize=16, color="tab:green", label=f"chosen ({p['status']})")
        if p["uniform"] is not None:
            ax.plot(*p["uniform"], "s", color="tab:orange", label="uniform ratio, nearest MACs")
        ax.axhline(p["line"], color="tab:red", linestyle="--", label=f"budget: reference - {p['max_drop']:g} pt")
        ax.set_xlabel(p["xlabel"])
        if p["stage"] == "quantize":
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("validation top-1 (%)")
        what = "pruning" if p["stage"] == "prune" else "int8"
        ax.set_title(f"{r.id}: {what} within {p['max_drop']:g} pt")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_sweep(keys: Sequence[str], records: Sequence[Record], out_dir: Path) -> list[Path]:
    """Every plot the records have data for, written under ``out_dir``; returns the files."""
    written = []
    size = accuracy_series(records, "file_bytes")
    if size:
        written.append(
            render_accuracy(size, "model file size (MB)", "accuracy against size", out_dir / "accuracy_vs_size.png")
        )
    # speed as a ratio to the base model timed in the same job: raw latencies of different jobs (a busier
    # node, another CPU) do not compare
    speed = accuracy_series(records, "speed_factor")
    if speed:
        written.append(
            render_accuracy(
                speed,
                "speed-up over the base model (fp32 eager) timed in the same job, batch-1 latency (×)",
                "accuracy against speed, each model against the base timed in its own job",
                out_dir / "accuracy_vs_latency.png",
                x_better="max",
            )
        )
    by, curves = learning_series(keys, records)
    if curves:
        written.append(render_learning(by, curves, out_dir / "learning_curves.png"))
    sparsity = sparsity_series(records)
    if sparsity:
        written.append(render_sparsity(sparsity, out_dir / "sparsity.png"))
    for r in records:  # one plot per run with a budget: every attempt
        if (budget := render_budget(r, out_dir / f"budget_{r.id}.png")) is not None:
            written.append(budget)
    return written
