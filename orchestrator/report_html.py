"""report.html: the run's report as one self-contained page with PNG plots beside it.

``write_html(report, out_dir)`` writes ``out_dir/report.html`` and ``out_dir/plots/*.png``
(matplotlib's Agg canvas, no pyplot state, no display needed). Images are linked relatively, so
the directory can be opened from disk or copied anywhere; no script, no server, no network.

Every plot is optional and drawn only when its data is in the report:

- ``params.png``: parameters before/after (base, winner, export), FF and the rest.
- ``pareto.png``: every candidate's parameters vs perplexity, the non-dominated front, the winner
  marked, the base model as reference lines. Candidates dropped early by successive halving were
  scored on fewer tokens and are drawn hollow.
- ``halving.png``: perplexity per successive-halving round (tokens scored) for every candidate.
- ``similarity.png``: the per-layer similarity matrix (``report["similarity"]``, [L, L]).
- ``layer_errors.png``: per-layer reconstruction/NTK error per method (``report["layer_errors"]``).
- ``distill.png``: the distillation loss curve (``report["distill"]["losses"]``).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

PLOTS = "plots"


# ----- helpers --------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    """A finite float, or None (missing, NaN, inf, not a number)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt_int(v: Any) -> str:
    f = _num(v)
    return "–" if f is None else f"{int(round(f)):,}"


def _fmt_float(v: Any, digits: int = 3) -> str:
    f = _num(v)
    if f is None:
        return "–"
    return f"{f:.{digits}g}" if abs(f) >= 1e5 or (f != 0 and abs(f) < 1e-3) else f"{f:.{digits}f}"


def _fmt_pct(new: Any, old: Any) -> str:
    a, b = _num(new), _num(old)
    if a is None or b is None or b == 0:
        return "–"
    return f"{100.0 * (a - b) / b:+.1f}%"


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _compact(v: Any, limit: int = 160) -> str:
    if v is None or v == {}:
        return ""
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str, separators=(", ", ": "))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _figure(width: float = 7.0, height: float = 4.2) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")


def _human(x: float, _pos: Any = None) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:.3g}"


def _log_if_wide(ax: Any, values: list[float], axis: str = "y") -> None:
    pos = [v for v in values if v > 0]
    if pos and len(pos) == len(values) and max(pos) / min(pos) > 20:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _candidates(report: dict) -> list[dict]:
    return [c for c in report.get("candidates") or [] if isinstance(c, dict)]


def _winner_name(report: dict) -> str | None:
    w = report.get("winner")
    return w.get("name") if isinstance(w, dict) else None


def _max_tokens(cands: list[dict]) -> float | None:
    toks = [_num(r.get("tokens")) for c in cands for r in c.get("rounds") or [] if isinstance(r, dict)]
    found = [t for t in toks if t is not None]
    return max(found) if found else None


def _finalist(c: dict, max_tokens: float | None) -> bool:
    rounds = [r for r in c.get("rounds") or [] if isinstance(r, dict)]
    if not rounds or max_tokens is None:
        return True
    return _num(rounds[-1].get("tokens")) == max_tokens


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (fewer params and lower perplexity are better),
    ordered by params."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


# ----- plots ------------------------------------------------------------------------------------


def plot_params(report: dict, path: Path) -> bool:
    base = report.get("base") or {}
    rows: list[tuple[str, float | None, float | None]] = []
    if _num(base.get("params")) is not None:
        rows.append(("base", _num(base.get("params")), _num(base.get("ff_params"))))
    winner = _winner_name(report)
    for c in _candidates(report):
        if c.get("name") == winner and _num(c.get("params")) is not None:
            rows.append((f"winner\n{winner}", _num(c.get("params")), _num(c.get("ff_params"))))
    exp = report.get("export") or {}
    if _num(exp.get("params")) is not None:
        rows.append(("export", _num(exp.get("params")), _num(exp.get("ff_params"))))
        if _num(exp.get("unique_params")) is not None and exp.get("unique_params") != exp.get("params"):
            rows.append(("export\n(tied, unique)", _num(exp.get("unique_params")), _num(exp.get("unique_ff_params"))))
    if len(rows) < 1:
        return False
    fig = _figure(7.0, 1.2 + 0.55 * len(rows))
    ax = fig.add_subplot()
    labels = [r[0] for r in rows]
    y = list(range(len(rows)))[::-1]
    for yi, (_, total, ff) in zip(y, rows):
        total = total or 0.0
        if ff is None:  # FF share unknown: one bar for the total
            ax.barh([yi], [total], color="#c9d1d9", hatch="//", edgecolor="#9aa5b1")
        else:
            ax.barh([yi], [total - ff], color="#9aa5b1")
            ax.barh([yi], [ff], left=[total - ff], color="#2f7ed8")
        ax.text(total, yi, " " + _human(total), va="center", fontsize=9)
    from matplotlib.patches import Patch

    handles = [Patch(color="#9aa5b1", label="other (embeddings, attention, norms)"),
               Patch(color="#2f7ed8", label="feed-forward")]
    if any(r[2] is None for r in rows):
        handles.append(Patch(facecolor="#c9d1d9", hatch="//", edgecolor="#9aa5b1",
                             label="total (FF share not reported)"))
    ax.set_yticks(y, labels)
    ax.xaxis.set_major_formatter(_human)
    ax.set_xlabel("parameters")
    ax.set_xlim(0, max(r[1] or 0.0 for r in rows) * 1.15 or 1)
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.28 if len(rows) < 3 else -0.18),
              ncol=3, fontsize=8, frameon=False)
    ax.set_title("Parameters before and after")
    _save(fig, path)
    return True


def plot_pareto(report: dict, path: Path) -> bool:
    cands = [c for c in _candidates(report)
             if _num(c.get("params")) is not None and _num(c.get("perplexity")) is not None]
    if not cands:
        return False
    from matplotlib.lines import Line2D

    base = report.get("base") or {}
    winner = _winner_name(report)
    max_tokens = _max_tokens(cands)
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    methods = sorted({str(c.get("method", "?")) for c in cands})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    pts = [(float(c["params"]), float(c["perplexity"])) for c in cands]
    for c, (x, yv) in zip(cands, pts):
        col = colors[str(c.get("method", "?"))]
        full = _finalist(c, max_tokens)
        ax.scatter([x], [yv], s=36, color=col if full else "none", edgecolors=col, linewidths=1.3, zorder=3)
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="#555", lw=1, ls="-", zorder=2)
    handles = [Line2D([], [], marker="o", ls="", color=colors[m], label=m) for m in methods]
    for c, (x, yv) in zip(cands, pts):
        if c.get("name") == winner:
            ax.scatter([x], [yv], s=260, marker="*", color="gold", edgecolors="black", linewidths=1.0, zorder=4)
            ax.annotate(str(winner), (x, yv), xytext=(6, 8), textcoords="offset points", fontsize=9)
            handles.append(Line2D([], [], marker="*", ls="", markersize=13, color="gold", markeredgecolor="black",
                                  label="winner"))
    bp, bppl = _num(base.get("params")), _num(base.get("perplexity"))
    if bppl is not None:
        ax.axhline(bppl, color="black", ls="--", lw=1)
        handles.append(Line2D([], [], color="black", ls="--", label=f"base perplexity {bppl:.3g}"))
    if bp is not None:
        ax.axvline(bp, color="black", ls=":", lw=1)
        handles.append(Line2D([], [], color="black", ls=":", label=f"base params {_human(bp)}"))
    if any(not _finalist(c, max_tokens) for c in cands):
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="none", markeredgecolor="#555",
                              label="dropped early (fewer tokens)"))
    handles.append(Line2D([], [], color="#555", lw=1, label="Pareto front"))
    _log_if_wide(ax, [p[1] for p in pts] + ([bppl] if bppl else []))
    ax.xaxis.set_major_formatter(_human)
    ax.set_xlabel("parameters")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title("Candidates: size vs quality")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="best")
    _save(fig, path)
    return True


def plot_halving(report: dict, path: Path) -> bool:
    cands = [c for c in _candidates(report) if c.get("rounds")]
    series: list[tuple[dict, list[tuple[float, float]]]] = []
    for c in cands:
        raw = [(_num(r.get("tokens")), _num(r.get("perplexity"))) for r in c["rounds"] if isinstance(r, dict)]
        pts = [(t, p) for t, p in raw if t is not None and p is not None]
        if pts:
            series.append((c, pts))
    if not series or all(len(p) < 2 for _, p in series) and len(series) < 2:
        return False
    winner = _winner_name(report)
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    methods = sorted({str(c.get("method", "?")) for c, _ in series})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for c, pts in series:
        win = c.get("name") == winner
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                color=colors[str(c.get("method", "?"))], lw=2.4 if win else 1.0, alpha=1.0 if win else 0.6,
                label=f"{c.get('name')} (winner)" if win else None)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[m], label=m) for m in methods]
    handles += [h for h in ax.get_legend_handles_labels()[0]]
    _log_if_wide(ax, [p for _, pts in series for _, p in pts])
    ticks = sorted({t for _, pts in series for t, _ in pts})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [_human(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("tokens scored (successive-halving round)")
    ax.set_ylabel("perplexity")
    ax.set_title("Successive halving")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    _save(fig, path)
    return True


def plot_similarity(report: dict, path: Path) -> bool:
    sim = report.get("similarity")
    if isinstance(sim, dict):
        sim = sim.get("matrix")
    try:
        import numpy as np

        m = np.asarray(sim, dtype=float)
    except (TypeError, ValueError):
        return False
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        return False
    fig = _figure(5.6, 4.8)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="viridis", interpolation="nearest", origin="upper")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("Per-layer FF similarity")
    _save(fig, path)
    return True


def plot_layer_errors(report: dict, path: Path, key: str = "layer_errors",
                      title: str = "Per-layer FF output reconstruction error (held-out tokens)") -> bool:
    errs = report.get(key)
    if not isinstance(errs, dict):
        return False
    series = {}
    for method, vals in errs.items():
        if isinstance(vals, (list, tuple)):
            ys = [_num(v) for v in vals]
            if any(y is not None for y in ys):
                series[str(method)] = ys
    if not series:
        return False
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    allv = []
    for i, (method, ys) in enumerate(sorted(series.items())):
        allv += [y for y in ys if y is not None]
        # Missing layers stay gaps (NaN breaks the line) rather than being bridged.
        ax.plot(range(len(ys)), [math.nan if y is None else y for y in ys], marker="o", ms=3, label=method,
                color=f"C{i % 10}")
    _log_if_wide(ax, allv)
    ax.set_xlabel("layer")
    ax.set_ylabel("error")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _loss_points(losses: Any) -> list[tuple[float, float]]:
    pts: list[tuple[float, float]] = []
    if not isinstance(losses, (list, tuple)):
        return pts
    for i, v in enumerate(losses):
        if isinstance(v, dict):
            x, y = _num(v.get("step", i)), _num(v.get("loss"))
        elif isinstance(v, (list, tuple)) and len(v) == 2:
            x, y = _num(v[0]), _num(v[1])
        else:
            x, y = float(i), _num(v)
        if x is not None and y is not None:
            pts.append((x, y))
    return pts


def plot_distill(report: dict, path: Path) -> bool:
    d = report.get("distill")
    pts = _loss_points(d.get("losses")) if isinstance(d, dict) else []
    if len(pts) < 2:
        return False
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="C3", lw=1.2)
    _log_if_wide(ax, [p[1] for p in pts])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Distillation loss")
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


PLOT_FNS: tuple[tuple[str, str, Callable[[dict, Path], bool]], ...] = (
    ("params", "Parameters before and after", plot_params),
    ("pareto", "Candidates: parameters vs perplexity", plot_pareto),
    ("halving", "Successive halving rounds", plot_halving),
    ("similarity", "Per-layer similarity", plot_similarity),
    ("layer_errors", "Per-layer reconstruction error of the best candidate of each method", plot_layer_errors),
    ("ntk_errors", "Per-layer empirical NTK error of the best candidate of each method",
     lambda r, p: plot_layer_errors(r, p, "ntk_errors", "Per-layer empirical NTK error (FF parameters)")),
    ("distill", "Distillation loss", plot_distill),
)


# ----- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;
     padding:0 1rem;color:#1f2328;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de}
.muted{color:#656d76}.summary{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:.6rem}
.card{border:1px solid #d0d7de;border-radius:6px;padding:.6rem .8rem}.card b{display:block;font-size:1.15rem}
table{border-collapse:collapse;width:100%;font-size:.88rem;margin:.5rem 0}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.win{background:#fff8c5}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#656d76;font-size:.85rem}code{font-size:.85em}
"""


def _table(headers: list[str], rows: list[list[tuple[str, bool]]], row_classes: list[str] | None = None) -> str:
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for k, row in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        cells = "".join(f'<td class="n">{v}</td>' if num else f"<td>{v}</td>" for v, num in row)
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _summary(report: dict) -> str:
    base = report.get("base") or {}
    winner = _winner_name(report)
    wc = next((c for c in _candidates(report) if c.get("name") == winner), None)
    cards = [("base parameters", _fmt_int(base.get("params"))),
             ("base FF parameters", _fmt_int(base.get("ff_params"))),
             ("base perplexity", _fmt_float(base.get("perplexity")))]
    if wc is not None:
        cards += [("winner", _e(winner)),
                  ("winner parameters",
                   f"{_fmt_int(wc.get('params'))} ({_fmt_pct(wc.get('params'), base.get('params'))})"),
                  ("winner perplexity",
                   f"{_fmt_float(wc.get('perplexity'))} ({_fmt_pct(wc.get('perplexity'), base.get('perplexity'))})")]
    d = report.get("distill")
    if isinstance(d, dict) and _num(d.get("perplexity")) is not None:
        cards.append(("after distillation", _fmt_float(d.get("perplexity"))))
    if _num(report.get("seconds")) is not None:
        cards.append(("wall time", f"{float(report['seconds']):.1f} s"))
    return '<div class="summary">' + "".join(
        f'<div class="card"><span class="muted">{_e(k)}</span><b>{v}</b></div>' for k, v in cards) + "</div>"


def _candidates_table(report: dict) -> str:
    cands = _candidates(report)
    if not cands:
        return ""
    base = report.get("base") or {}
    winner = _winner_name(report)
    max_tokens = _max_tokens(cands)

    def key(c: dict) -> tuple:
        p = _num(c.get("perplexity"))
        return (not _finalist(c, max_tokens), p if p is not None else math.inf)

    rows, classes = [], []
    for c in sorted(cands, key=key):
        rounds = [r for r in c.get("rounds") or [] if isinstance(r, dict)]
        rtxt = ", ".join(f"{_fmt_int(r.get('tokens'))}: {_fmt_float(r.get('perplexity'))}" for r in rounds)
        name = _e(c.get("name", "")) + (" ★" if c.get("name") == winner else "")
        rows.append([
            (name, False), (_e(c.get("method", "")), False), (f"<code>{_e(_compact(c.get('settings')))}</code>", False),
            (_fmt_int(c.get("params")), True), (_fmt_pct(c.get("params"), base.get("params")), True),
            (_fmt_float(c.get("perplexity")), True), (_fmt_pct(c.get("perplexity"), base.get("perplexity")), True),
            (_e(rtxt), False), (_fmt_float(c.get("seconds"), 2), True),
        ])
        classes.append("win" if c.get("name") == winner else "")
    return _table(["candidate", "method", "settings", "params", "Δ params", "perplexity", "Δ ppl",
                   "rounds (tokens: ppl)", "seconds"], rows, classes)


def sets_rows(report: dict) -> list[dict[str, Any]]:
    """Per held-out set: its role, the base model's perplexity and the winner's (with its ratio to
    the base on the same windows, KL from the base and top-1 agreement), and the distilled model's
    where there is one. Shared by the HTML report and the model card."""
    base = (report.get("base") or {}).get("sets") or {}
    won = (report.get("winner") or {}).get("sets") or {}
    dist = (report.get("distill") or {}).get("sets") or {}
    roles = {n: st.get("role", "") for n, st in ((report.get("data") or {}).get("sets") or {}).items()}
    rows = []
    for name in won or base:
        w, d = won.get(name, {}), dist.get(name, {})
        rows.append({"set": name, "role": roles.get(name, ""), "base": (base.get(name) or {}).get("perplexity"),
                     "winner": w.get("perplexity"), "ratio": w.get("ratio"), "kl": w.get("kl"), "top1": w.get("top1"),
                     "tokens": w.get("tokens"), "distilled": d.get("perplexity"), "distilled_ratio": d.get("ratio")})
    return rows


def _sets_table(report: dict) -> str:
    rows = sets_rows(report)
    if not rows or all(r["winner"] is None for r in rows):
        return ""
    out = [[(_e(r["set"]), False), (_e(r["role"]), False), (_fmt_float(r["base"]), True), (_fmt_float(r["winner"]), True),
            (_fmt_float(r["ratio"]) + "×" if r["ratio"] is not None else "–", True), (_fmt_float(r["kl"], 4), True),
            (_fmt_float(r["top1"]), True), (_fmt_int(r["tokens"]), True),
            (_fmt_float(r["distilled"]) + (f" ({_fmt_float(r['distilled_ratio'])}×)" if r["distilled_ratio"] else ""), True)]
           for r in rows]
    return _table(["held-out set", "kind", "base ppl", "winner ppl", "ratio", "KL from base", "top-1 agreement",
                   "tokens", "distilled ppl"], out)


def _stages_table(report: dict) -> str:
    stages = report.get("stages")
    if not isinstance(stages, dict) or not stages:
        return ""
    rows = []
    for name, s in stages.items():
        s = s if isinstance(s, dict) else {}
        rows.append([(_e(name), False), (_e(s.get("stage", "")), False), (_e(s.get("status", "")), False),
                     (_fmt_float(s.get("seconds"), 2), True), (f"<code>{_e(s.get('cache_key', ''))}</code>", False)])
    return _table(["stage", "kind", "status", "seconds", "cache key"], rows)


def _export_section(report: dict) -> str:
    exp = report.get("export")
    if not isinstance(exp, dict) or not exp:
        return ""
    fields = [("path", _e(exp.get("path", ""))), ("form", _e(exp.get("form", ""))),
              ("parameters (as loaded)", _fmt_int(exp.get("params"))),
              ("unique parameters", _fmt_int(exp.get("unique_params"))),
              ("FF parameters", _fmt_int(exp.get("ff_params"))),
              ("zero-padding parameters", _fmt_int(exp.get("padded_params"))),
              ("decoder layers", _fmt_int(exp.get("num_hidden_layers"))),
              ("FF sizes", _e(_compact(exp.get("intermediate_sizes", exp.get("intermediate_size")))))]
    return "<h2>Export</h2>" + _table(["", ""], [[(k, False), (v, False)] for k, v in fields])


def write_html(report: dict, out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` and its plots under ``out_dir/plots/``; returns the HTML path."""
    out_dir = Path(out_dir)
    plots_dir = out_dir / PLOTS
    plots_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for name, caption, fn in PLOT_FNS:
        path = plots_dir / f"{name}.png"
        try:
            drawn = fn(report, path)
        except Exception as e:  # a malformed section must not cost the whole report
            drawn = False
            figures.append(f'<p class="muted">{_e(caption)}: not drawn ({_e(type(e).__name__)}: {_e(e)})</p>')
        if drawn:
            figures.append(f'<figure><img src="{PLOTS}/{name}.png" alt="{_e(caption)}">'
                           f"<figcaption>{_e(caption)}</figcaption></figure>")
        elif path.exists():
            path.unlink()  # stale plot from an earlier report

    title = f"mlpfuse report: {report.get('name', '')}"
    winner = report.get("winner") if isinstance(report.get("winner"), dict) else None
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">model <code>{_e(report.get("model", ""))}</code></p>',
        _summary(report),
    ]
    if winner:
        parts.append(f"<p><b>Winner:</b> {_e(winner.get('name', ''))}. {_e(winner.get('reason', ''))}</p>")
    for note in report.get("notes") or []:
        parts.append(f"<p>{_e(note)}</p>")
    if figures:
        parts += ["<h2>Plots</h2>", *figures]
    held = _sets_table(report)
    if held:
        parts += ["<h2>Held-out sets</h2>", '<p class="muted">Each set scored on its own windows; ratio and KL '
                  "against the base model on the same tokens (KL over the base's top-K tokens plus the rest: a lower "
                  "bound of the full KL).</p>", held]
    samples = report.get("samples")
    if isinstance(samples, list) and samples:
        parts += ["<h2>Greedy continuations</h2>", _table(
            ["prompt", "base model", "winner"],
            [[(f"<code>{_e(x.get('prompt', ''))}</code>", False), (f"<code>{_e(x.get('base', ''))}</code>", False),
              (f"<code>{_e(x.get('winner', ''))}</code>", False)] for x in samples if isinstance(x, dict)])]
    cand = _candidates_table(report)
    if cand:
        parts += ["<h2>Candidates</h2>", cand]
    parts.append(_export_section(report))
    stages = _stages_table(report)
    if stages:
        parts += ["<h2>Stages</h2>", stages]
    parts.append("</body></html>")
    path = out_dir / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text("\n".join(p for p in parts if p), encoding="utf-8")
    tmp.replace(path)
    return path
