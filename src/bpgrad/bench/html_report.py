"""``report.html``: the report as one self-contained page with interactive curves.

The page is a single file with its CSS, JavaScript and data inline (no CDN, no web fonts, no
requests), so it opens from disk, from an archive or from a CI artifact without a network. It
holds the same text and tables as ``report.md`` (rendered from the same blocks, see
:func:`bpgrad.bench.report.report_blocks`) and, per problem, one chart per metric: training
loss against step, test error (or test loss) and test loss per evaluation, and BPGrad's
:math:`\\eta_t` where logged. The charts are drawn in the browser as SVG by
``report_assets/report.js`` from the JSON that :func:`chart_data` makes: hovering shows the
values under the pointer, clicking an optimizer in a legend hides or shows it in every chart of
its problem, and each chart switches its axes between linear and log scale.

Data flow: result files → :func:`bpgrad.bench.analysis.analyse` (pure) → :func:`chart_data`
(pure: curves → plain JSON) → :func:`render_html` (string) → :func:`write_html` (atomic write).
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bpgrad.bench.analysis import (
    Analysis,
    Curve,
    epoch_curves,
    evaluation_axis,
    loss_curves,
    series_curves,
)
from bpgrad.bench.results import atomic_write_text

if TYPE_CHECKING:
    from bpgrad.bench.report import Block

HTML_NAME = "report.html"
#: most points a curve keeps in the page; longer per-step series are averaged in buckets
MAX_POINTS = 1000
_ASSETS = "report_assets"


def _number(value: float) -> float | None:
    """A finite value rounded to 6 significant digits (the page shows 4); NaN/inf -> None."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


def downsample(curve: Curve, max_points: int = MAX_POINTS) -> tuple[Curve, int]:
    """Average ``curve`` over buckets of ``k`` consecutive points so it has ≤ ``max_points``.

    Returns the new curve and ``k`` (1 when nothing was averaged). A bucket's x is its last
    point's x (the step the average runs up to); its mean and std are the means of the finite
    values in it (NaN when it holds none, which breaks the drawn line as a gap should).
    """
    n = len(curve.x)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    if n <= max_points:
        return curve, 1
    k = math.ceil(n / max_points)
    xs: list[float] = []
    means: list[float] = []
    stds: list[float] = []
    for start in range(0, n, k):
        stop = min(start + k, n)
        xs.append(curve.x[stop - 1])
        for src, dst in ((curve.mean, means), (curve.std, stds)):
            finite = [v for v in src[start:stop] if math.isfinite(v)]
            dst.append(sum(finite) / len(finite) if finite else math.nan)
    return Curve(curve.label, xs, means, stds, curve.n_seeds), k


def _series(curves: Sequence[Curve]) -> list[dict[str, Any]]:
    return [{"label": c.label, "n_seeds": c.n_seeds,
             "x": [_number(v) for v in c.x],
             "mean": [_number(v) for v in c.mean],
             "std": [_number(v) for v in c.std]} for c in curves]


def _all_positive(curves: Sequence[Curve]) -> bool:
    values = [v for c in curves for v in c.mean if math.isfinite(v)]
    return bool(values) and all(v > 0 for v in values)


def _chart(problem: str, metric: str, title: str, x_label: str, y_label: str,
           curves: Sequence[Curve], *, note: str, y_log: bool) -> dict[str, Any]:
    return {"id": f"{problem}-{metric}", "metric": metric, "title": title, "x_label": x_label,
            "y_label": y_label, "note": note, "y_log": y_log and _all_positive(curves),
            "series": _series(curves)}


def chart_data(analysis: Analysis, *, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """The charts of ``analysis`` as plain, strict-JSON data (the page's only input for curves).

    One entry per problem, with the optimizer labels in table order (the order that fixes each
    optimizer's colour) and its charts; each chart has ``id``, ``metric``, ``title``, axis
    labels, a ``note``, ``y_log`` (the initial scale) and ``series``: per label, ``x``,
    ``mean``, ``std`` (over seeds, ``null`` where no seed has a finite value) and ``n_seeds``.
    Per-step series longer than ``max_points`` are bucket-averaged (see :func:`downsample`).
    Pure: no files, no clock.
    """
    problems = []
    for problem in analysis.problems:
        rows = analysis.rows_for(problem, selected_only=True)
        labels = [r.label for r in rows]
        trials = [t for t in analysis.trials if t.problem == problem]
        band = "band: ± std over seeds"
        charts = []
        losses, k = [], 1
        for curve in loss_curves(trials, labels=labels):
            small, k_curve = downsample(curve, max_points)
            losses.append(small)
            k = max(k, k_curve)
        every = f"mean of {k} consecutive steps per point; " if k > 1 else ""
        charts.append(_chart(problem, "train_loss", "training loss", "step",
                             "training loss (minibatch)", losses, y_log=True,
                             note=f"{every}{band}"))
        axis = evaluation_axis(trials)
        where = "per evaluation" + (" (epoch 0 = initial weights)" if axis == "epoch" else "")
        if rows and rows[0].has_accuracy:
            charts.append(_chart(problem, "test_error", "test error", axis,
                                 "test error (1 − accuracy)",
                                 epoch_curves(trials, "test_error", labels=labels, x=axis),
                                 y_log=False, note=f"{where}; {band}"))
        charts.append(_chart(problem, "test_loss", "test loss", axis, "test loss",
                             epoch_curves(trials, "test_loss", labels=labels, x=axis),
                             y_log=False, note=f"{where}; {band}"))
        eta = [downsample(c, max_points)[0] for c in series_curves(trials, "eta", labels=labels)]
        if eta:
            charts.append(_chart(problem, "eta", "BPGrad step size η_t", "step", "η_t", eta,
                                 y_log=True, note=f"logged by the optimizer; {band}"))
        charts = [c for c in charts if c["series"]]
        problems.append({"name": problem, "labels": labels, "charts": charts})
    return {"problems": problems}


# ---------------------------------------------------------------------------------------------
# HTML


_CODE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(.+?)\*\*")
_EM = re.compile(r"\*(.+?)\*")


def inline(text: str) -> str:
    """The report's inline markdown (``code``, **strong**, *em*) as escaped HTML."""
    parts = _CODE.split(text)  # odd indices are code spans
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
        else:
            escaped = html.escape(part, quote=False)
            out.append(_EM.sub(r"<em>\1</em>", _STRONG.sub(r"<strong>\1</strong>", escaped)))
    return "".join(out)


def _table(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    numeric = re.compile(r"^(?:[-+]?[\d.]+(?: ± [\d.]+)?|-)(?: \(\d+/\d+\))?$")
    head = "".join(f"<th>{inline(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if numeric.match(c) else "text"}">{inline(c)}</td>'
                         for c in row) + "</tr>"
        for row in cells)
    return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _charts_html(problem: dict[str, Any]) -> str:
    figures = []
    for chart in problem["charts"]:
        figures.append(
            f'<figure class="chart" data-chart="{html.escape(chart["id"])}">'
            f'<figcaption>{html.escape(chart["title"])}</figcaption>'
            f'<div class="chart-body"></div>'
            f'<p class="chart-note">{html.escape(chart["note"])}</p></figure>')
    if not figures:
        return "<p>No curves yet.</p>"
    return ('<p class="hint">Hover a chart for values; click an optimizer to hide or show it in '
            'every chart of this problem; the buttons switch an axis between linear and log.</p>'
            f'<div class="charts">{"".join(figures)}</div>')


def _blocks_html(blocks: Sequence[Block], charts: dict[str, dict[str, Any]]) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            ident = f' id="{html.escape(b.anchor)}"' if b.anchor else ""
            out.append(f"<{b.kind}{ident}>{inline(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{inline(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "code":
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "table":
            if b.text:
                out.append(f'<p class="table-title">{inline(b.text)}</p>')
            out.append(_table(b.header, b.cells))
        elif b.kind == "curves":
            out.append(_charts_html(charts.get(b.text, {"charts": []})))
        else:
            raise ValueError(f"unknown report block kind {b.kind!r}")
    return "\n".join(out)


def _asset(name: str) -> str:
    return resources.files("bpgrad.bench").joinpath(_ASSETS).joinpath(name).read_text(encoding="utf-8")


def _script_json(data: Any) -> str:
    """JSON safe inside ``<script>``: no ``</script>``, no ``<!--``, strict (no NaN)."""
    text = json.dumps(data, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(title: str, blocks: Sequence[Block], data: dict[str, Any]) -> str:
    """The whole page as one string (blocks as HTML, ``data`` embedded as JSON)."""
    charts = {p["name"]: p for p in data["problems"]}
    # The error recorder runs first, in <head>, so that any error of the drawing script (or of
    # the browser refusing it) lands in #js-errors, where a headless test reads it.
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="bpgrad">
<title>{html.escape(title)}</title>
<style>
{_asset("report.css")}
</style>
<script>
{_asset("errors.js")}
</script>
</head>
<body data-status="loading">
<pre id="js-errors" hidden></pre>
<main>
{_blocks_html(blocks, charts)}
</main>
<script id="bpgrad-data" type="application/json">{_script_json(data)}</script>
<script>
{_asset("report.js")}
</script>
</body>
</html>
"""


def write_html(path: Path, title: str, blocks: Sequence[Block], analysis: Analysis) -> Path:
    """Write ``report.html`` atomically; returns its path."""
    atomic_write_text(Path(path), render_html(title, blocks, chart_data(analysis)))
    return Path(path)
