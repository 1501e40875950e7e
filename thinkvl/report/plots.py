"""PNG curves for a run directory: one SFT stage, one RL stage, or a whole pipeline.

``plot_run(run_dir)`` looks at what the directory holds:

* ``metrics.jsonl`` with ``reward`` keys: an RL stage -> ``plots/rl_curves.png``
  (reward and its parts, accuracy, response length, KL, entropy, truncated fraction);
* ``metrics.jsonl`` otherwise: an SFT stage -> ``plots/sft_curves.png``
  (loss and eval loss, learning rate, held-out accuracy / format, eval length, grad norm);
* no ``metrics.jsonl`` but stage subfolders (``01_sft_stage1/``, ``05_rl/``, ...): a pipeline ->
  each stage's curves in ``<stage>/plots/`` plus ``plots/stages.png``, a bar chart of the
  held-out numbers from each stage's ``eval/summary.json``.

Only the panels whose keys appear are drawn; non-numeric fields (event lines, strings) are
skipped. Noisy per-step series are shown as faint raw points under a debiased EMA; sparse
series (eval points, learning rate) are drawn as they are. Figures are drawn on matplotlib's Agg
canvas directly: no pyplot, no display, no change to the global backend.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = Path("eval") / "summary.json"
RESPONSES_FILE = Path("eval") / "responses.jsonl"
STAGES_PNG = "stages.png"
# Folders of a pipeline directory that are outputs, never stages.
_NOT_STAGES = {PLOTS_DIR, "report_assets"}
_DPI = 110
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")

Row = dict[str, float]
Stage = tuple[str, Path]


@dataclass(frozen=True)
class Line:
    """One series in a panel: a metrics key, its legend label, whether to draw an EMA over it."""

    key: str
    label: str
    smooth: bool = True


@dataclass(frozen=True)
class Panel:
    """One subplot: a title, a y label and the series it may hold."""

    title: str
    ylabel: str
    lines: tuple[Line, ...]
    fraction: bool = False  # y in [0, 1]
    sci: bool = False  # scientific y tick labels (learning rate)


SFT_PANELS: tuple[Panel, ...] = (
    Panel("Loss", "loss", (Line("loss", "train"), Line("eval/loss", "eval", smooth=False))),
    Panel("Learning rate", "lr", (Line("lr", "lr", smooth=False),), sci=True),
    Panel("Held-out accuracy", "fraction",
          (Line("eval/accuracy", "accuracy", smooth=False), Line("eval/format", "format", smooth=False)),
          fraction=True),
    Panel("Held-out response length", "tokens", (Line("eval/response_length", "mean", smooth=False),)),
    Panel("Gradient norm", "norm", (Line("grad_norm", "grad norm"),)),
)

RL_PANELS: tuple[Panel, ...] = (
    Panel("Reward", "reward",
          (Line("reward", "total"), Line("reward/correct", "correctness"),
           Line("reward/length", "length reward (before its weight)"))),
    Panel("Accuracy", "fraction",
          (Line("accuracy", "rollouts"), Line("eval/accuracy", "held-out", smooth=False)), fraction=True),
    Panel("Response length", "tokens",
          (Line("response_length/mean", "mean"), Line("response_length/correct_mean", "correct only"))),
    Panel("KL to reference", "KL", (Line("kl", "kl"),)),
    Panel("Entropy", "nats / token", (Line("entropy", "entropy"),)),
    Panel("Truncated responses", "fraction", (Line("truncated_frac", "truncated"),), fraction=True),
)


# --- reading ---------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file; blank lines are ignored, malformed ones skipped with a warning."""
    out: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
        else:
            bad += 1
    if bad:
        log.warning("%s: skipped %d malformed line(s)", path, bad)
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path: str | Path) -> list[Row]:
    """The numeric fields of each line of a metrics.jsonl (strings, NaN, booleans dropped; a line
    left with nothing but its step, such as a bare start event, is dropped too).

    Raises ValueError naming the file when it has no line with a metric besides ``step``.
    """
    path = Path(path)
    rows = []
    for obj in read_jsonl(path):
        row = {k: float(v) for k, v in obj.items() if _is_number(v)}
        if set(row) - {"step"}:
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no metric lines (the file is empty or holds only events); nothing to plot")
    return rows


def series(rows: Sequence[Row], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key over the rows that have it; the line index stands in for a missing step."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        if key in row:
            xs.append(row.get("step", float(i)))
            ys.append(row[key])
    return xs, ys


def detect_kind(rows: Sequence[Row]) -> str:
    """``"rl"`` when any line carries a reward, else ``"sft"``."""
    rl = any(k == "reward" or k.startswith("reward/") for row in rows for k in row)
    return "rl" if rl else "sft"


def find_stages(pipeline_dir: str | Path) -> list[Stage]:
    """(folder name, path) of each subfolder holding metrics.jsonl or eval/summary.json, by name."""
    pipeline_dir = Path(pipeline_dir)
    return [(p.name, p) for p in sorted(pipeline_dir.iterdir())
            if p.is_dir() and p.name not in _NOT_STAGES
            and ((p / METRICS_FILE).is_file() or (p / SUMMARY_FILE).is_file())]


def load_summary(stage_dir: str | Path) -> dict[str, Any] | None:
    """A stage's eval/summary.json, or None when it has none; ValueError naming the file if unreadable."""
    path = Path(stage_dir) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return flatten_eval_summary(data) if "overall" in data else data


# thinkvl.eval names -> the report's names
_EVAL_KEYS = {"greedy_pass@1": "greedy_pass1", "sampled_pass@1": "sampled_pass1", "pass@k": "pass_at_k",
              "format_ok": "format_rate", "truncated": "truncated_frac"}


def _rename(group: dict[str, Any]) -> dict[str, Any]:
    return {_EVAL_KEYS.get(k, k): v for k, v in group.items()}


def flatten_eval_summary(data: dict[str, Any]) -> dict[str, Any]:
    """An evaluator summary ({settings, overall, by_task, ...}) in the report's flat form."""
    out = _rename(data["overall"])
    out["k"] = (data.get("settings") or {}).get("k")
    out["n_samples"] = (data.get("settings") or {}).get("n_samples")
    out["by_task"] = {t: _rename(g) for t, g in (data.get("by_task") or {}).items()}
    return out


# --- smoothing -------------------------------------------------------------------------------
def smoothing_weight(n: int) -> float:
    """EMA weight for a series of n points: none under 8 points, rising to 0.9 for long runs."""
    return 0.0 if n < 8 else min(0.9, 1.0 - 4.0 / n)


def ema(values: Sequence[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (as TensorBoard draws it); the first point is kept as is."""
    w = smoothing_weight(len(values)) if weight is None else weight
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = w * acc + (1.0 - w) * v
        norm = w * norm + (1.0 - w)
        out.append(acc / norm)
    return out


# --- drawing ---------------------------------------------------------------------------------
def _new_figure(n_panels: int, width: float = 4.6, height: float = 3.3,
                bottom: float = 0.5) -> tuple[Figure, list[Axes]]:
    """A grid of up to 3 columns. Margins are fixed in inches (a layout engine would double the
    drawing time): room for the y labels on the left, the x label below, titles above."""
    ncols = min(3, n_panels)
    nrows = math.ceil(n_panels / ncols)
    w, h = width * ncols, height * nrows
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    gap_h, gap_w = bottom + 0.45, 0.8  # between rows: x label + next title; between columns: y labels
    ax_h = (h - 0.65 - bottom - gap_h * (nrows - 1)) / nrows
    ax_w = (w - 0.85 - 0.2 - gap_w * (ncols - 1)) / ncols
    fig.subplots_adjust(left=0.85 / w, right=1 - 0.2 / w, bottom=bottom / h, top=1 - 0.65 / h,
                        hspace=gap_h / ax_h, wspace=gap_w / ax_w)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig: Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    return out


def _draw_line(ax: Axes, line: Line, xs: list[float], ys: list[float], color: str) -> None:
    if line.smooth and len(ys) >= 8:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8, marker="." if len(ys) <= 200 else None,
                markersize=3)
        ax.plot(xs, ema(ys), color=color, linewidth=1.8, label=line.label)
    else:
        ax.plot(xs, ys, color=color, linewidth=1.3, marker="o" if len(ys) <= 60 else None, markersize=3.5,
                label=line.label)


def _draw_panel(ax: Axes, panel: Panel, rows: Sequence[Row]) -> None:
    for i, line in enumerate(panel.lines):
        xs, ys = series(rows, line.key)
        if ys:
            _draw_line(ax, line, xs, ys, _COLORS[i % len(_COLORS)])
    ax.set_title(panel.title, fontsize=11)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.fraction:  # the full [0, 1] range, widened if a value falls outside it
        lo, hi = ax.dataLim.intervaly
        ax.set_ylim(min(-0.03, lo), max(1.03, hi))
    if panel.sci:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.legend(fontsize=8, loc="best")


def plot_panels(rows: Sequence[Row], panels: Sequence[Panel], title: str, out: Path) -> Path | None:
    """A grid of the panels that have data; None (nothing written) when none has."""
    present = [p for p in panels if any(series(rows, ln.key)[1] for ln in p.lines)]
    if not present:
        return None
    fig, axes = _new_figure(len(present))
    for ax, panel in zip(axes, present):
        _draw_panel(ax, panel, rows)
    fig.suptitle(f"{title}   (bold: EMA, faint: raw)", fontsize=12)
    return _save(fig, out)


def plot_stage(run_dir: str | Path) -> list[Path]:
    """Curves of one SFT or RL stage into ``run_dir/plots/{sft,rl}_curves.png``."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    rows = read_metrics(path)
    kind = detect_kind(rows)
    panels = RL_PANELS if kind == "rl" else SFT_PANELS
    out = plot_panels(rows, panels, f"{run_dir.name}: {kind.upper()}", run_dir / PLOTS_DIR / f"{kind}_curves.png")
    if out is None:
        keys = sorted({ln.key for p in panels for ln in p.lines})
        raise ValueError(f"{path}: none of the {kind.upper()} keys to plot is present (looked for {keys})")
    return [out]


def _bars(ax: Axes, names: list[str], groups: list[tuple[str, list[float | None]]], fmt: str) -> None:
    """Grouped bars, one group per stage; a missing value leaves a gap."""
    n = max(1, len(groups))
    width = 0.8 / n
    for i, (label, vals) in enumerate(groups):
        xs = [j + (i - (n - 1) / 2) * width for j, v in enumerate(vals) if v is not None]
        ys = [v for v in vals if v is not None]
        bars = ax.bar(xs, ys, width=width, label=label, color=_COLORS[i % len(_COLORS)])
        ax.bar_label(bars, fmt=fmt, fontsize=7, padding=1)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    top = max((v for _, vals in groups for v in vals if v is not None), default=1.0)
    ax.set_ylim(0, max(top, 1e-9) * 1.3)  # headroom for the value labels and the legend
    ax.legend(fontsize=7, loc="upper left", ncols=len(groups), frameon=False)


def _column(summaries: list[dict[str, Any]], key: str) -> list[float | None]:
    return [float(s[key]) if _is_number(s.get(key)) else None for s in summaries]


def _k_label(summaries: list[dict[str, Any]]) -> str:
    ks = {s.get("k") for s in summaries if _is_number(s.get("k"))}
    return f"pass@{int(ks.pop())}" if len(ks) == 1 else "pass@k"


def plot_stage_summary(stages: Sequence[Stage], out: Path) -> Path | None:
    """Bar chart of each stage's held-out accuracy, format / truncation rate and response length."""
    rows = [(name, s) for name, d in stages if (s := load_summary(d)) is not None]
    if not rows:
        return None
    names = [n for n, _ in rows]
    sums = [s for _, s in rows]
    charts = [
        ("Held-out accuracy", "fraction", "{:.2f}", True,
         [("greedy pass@1", _column(sums, "greedy_pass1")), ("sampled pass@1", _column(sums, "sampled_pass1")),
          (_k_label(sums), _column(sums, "pass_at_k"))]),
        ("Format and truncation", "fraction", "{:.2f}", True,
         [("format rate", _column(sums, "format_rate")), ("truncated", _column(sums, "truncated_frac"))]),
        ("Response length", "tokens", "{:.0f}", False,
         [("mean", _column(sums, "mean_length")), ("median", _column(sums, "median_length"))]),
    ]
    charts = [(t, y, f, frac, [g for g in groups if any(v is not None for v in g[1])])
              for t, y, f, frac, groups in charts]
    charts = [c for c in charts if c[4]]
    if not charts:
        return None
    fig, axes = _new_figure(len(charts), width=max(4.6, 1.3 * len(names) + 2.0), height=3.6, bottom=0.7)
    for ax, (title, ylabel, fmt, frac, groups) in zip(axes, charts):
        _bars(ax, names, groups, fmt)
        ax.set_title(title, fontsize=11)
        ax.set_ylabel(ylabel)
        if frac:
            ax.set_ylim(0, max(1.3, ax.get_ylim()[1]))
    fig.suptitle("Held-out evaluation per stage", fontsize=12)
    return _save(fig, out)


def plot_pipeline(pipeline_dir: str | Path, stages: Sequence[Stage] | None = None) -> list[Path]:
    """Each stage's curves (in ``<stage>/plots/``) and ``pipeline_dir/plots/stages.png``.

    A stage whose metrics cannot be plotted (empty file, no known keys) is skipped with a warning so
    that one broken stage does not hide the others; ValueError when nothing at all could be drawn.
    """
    pipeline_dir = Path(pipeline_dir)
    stages = find_stages(pipeline_dir) if stages is None else list(stages)
    out: list[Path] = []
    for name, stage_dir in stages:
        if (stage_dir / METRICS_FILE).is_file():
            try:
                out += plot_stage(stage_dir)
            except ValueError as err:
                log.warning("stage %s: no curves: %s", name, err)
    bar = plot_stage_summary(stages, pipeline_dir / PLOTS_DIR / STAGES_PNG)
    if bar is not None:
        out.append(bar)
    if not out:
        raise ValueError(f"{pipeline_dir}: nothing to plot: no stage has usable {METRICS_FILE} or {SUMMARY_FILE}")
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Detect the kind of run directory (SFT, RL or pipeline) and write its PNGs; returns their paths."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a directory")
    if (run_dir / METRICS_FILE).is_file():
        return plot_stage(run_dir)
    stages = find_stages(run_dir)
    if stages:
        return plot_pipeline(run_dir, stages)
    raise ValueError(f"{run_dir}: no {METRICS_FILE} and no stage subfolders with {METRICS_FILE} or {SUMMARY_FILE}")
