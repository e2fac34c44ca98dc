"""Plots of a results folder as PNG files (matplotlib, Agg canvas; ``pip install capkit[bench]``).

- ``masked_linear_speedup``: speed-up against dense ``F.linear`` by sparsity, one line per mask
  kind and pass (forward, forward+backward), one panel per shape.
- ``info_nce_scaling``: InfoNCE time (and peak memory where recorded, else speed-up) against the
  number of keys, capkit's streaming path against the naive one.
- ``roofline``: the roofline fraction (floor time / measured time) of every timed row that records
  one; benchmarks that record none are named in the plot's note.
- ``inference_speedup``: structured (compacted) and sparse-export inference speed-up by sparsity.

``make_plots(results, out_dir, suffix)`` writes ``<out_dir>/plots/<name><suffix>.png``; a plot
whose data is missing is skipped with the reason instead of raising.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

FAST = ("cpu", "triton", "cuda")
KIND_COLORS = {"unstructured": "tab:blue", "block": "tab:orange", "nm": "tab:green"}
MARKERS = "os^Dv<>P*X"
NOT_KERNELS = {"accuracy"}  # result files with no timed kernels (no roofline to speak of)


@dataclass
class Plot:
    name: str
    title: str
    path: Optional[Path] = None  # None: skipped
    note: str = ""  # why it was skipped, or what it leaves out


class Skip(Exception):
    """A plot's data is missing: the message says which."""


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kw):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _log2_speedup_axis(ax, label: str = "speed-up (×, log scale)") -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×" if v >= 0.25 else f"1/{1 / v:.0f}×"))
    ax.axhline(1.0, color="0.4", lw=0.9, ls="-", zorder=0)
    ax.set_ylabel(label)
    ax.grid(True, which="major", alpha=0.3)


def _need(results: Dict[str, Dict], name: str, suffix: str) -> Dict:
    data = results.get(name + suffix)
    if data is None:
        raise Skip(f"no {name}{suffix}.json in this folder")
    if not data.get("rows"):
        raise Skip(f"{name}{suffix}.json has no measured rows")
    return data


def masked_linear_speedup(results: Dict[str, Dict], suffix: str):
    data = _need(results, "masked_linear", suffix)
    rows = [r for r in data["rows"] if r.get("op") in ("forward", "forward+backward")
            and r.get("speedup_vs_dense") is not None and r.get("backend") not in ("dense", "masked")]
    if not rows:
        raise Skip("masked_linear results have no speed-up against dense (no fast backend ran)")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = _figure(5.2 * len(shapes), 4.6, ncols=len(shapes), sharey=True)
    handles = {}
    for ax, shape in zip(axes[0], shapes):
        groups: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = {}
        for r in rows:
            if r["shape"] == shape:
                pt = (100 * r["sparsity"], r["speedup_vs_dense"])
                groups.setdefault((r["kind"], r["op"], r["backend"]), []).append(pt)
        for (kind, op, backend), pts in sorted(groups.items()):
            pts.sort()
            fused = backend in FAST
            label = f"{kind}, {op}" + (f" ({backend})" if len(backends) > 1 or not fused else "")
            if not fused:
                label = f"PyTorch {backend}, {kind}, {op}"
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label,
                              color=KIND_COLORS.get(kind, "0.3") if fused else "0.55",
                              ls="-" if op == "forward" else "--", marker=MARKERS[backends.index(backend) % 10],
                              ms=5)
            handles.setdefault(label, line)
        one = next(r for r in rows if r["shape"] == shape)
        ax.set_title(f"{shape}: {one['N']}×{one['K']} weight, {one['M']} tokens", fontsize=10)
        ax.set_xlabel("sparsity (%)")
        _log2_speedup_axis(ax, "speed-up vs dense F.linear (×, log scale)" if ax is axes[0][0] else "")
    fig.suptitle(f"masked_linear on {data['machine'].get('device')} ({data.get('dtype')}): capkit against dense "
                 f"(solid: forward, dashed: forward+backward)", fontsize=11)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)), fontsize=8.5,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(handles) - 1) // 4), 1, 0.95))
    bs = data.get("block_size")
    return fig, f"block masks use {bs}×{bs} blocks; 2:4 (nm) is one point at 50%"


def _nce_label(backend: str, op: str) -> str:
    if backend == "torch":
        return f"naive (mm + log_softmax), {op}"
    if backend == "cross_entropy":
        return f"F.cross_entropy, 1 positive, {op}"
    return f"capkit {backend}, {op}"


def info_nce_scaling(results: Dict[str, Dict], suffix: str):
    data = _need(results, "info_nce", suffix)
    rows = data["rows"]
    ms = sorted({r["M"] for r in rows})
    bs_at = {m: sorted({r["B"] for r in rows if r["M"] == m}) for m in ms}
    split_b = any(len(b) > 1 for b in bs_at.values())
    memory = any(r.get("peak_extra_bytes") is not None for r in rows)
    fig, axes = _figure(12, 4.8, ncols=2)
    left, right = axes[0]
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["backend"], r["op"]) + ((r["B"],) if split_b else ()), []).append(r)
    pairs = sorted({key[:2] for key in groups})
    all_b = sorted({r["B"] for r in rows})
    for key, rs in sorted(groups.items()):
        rs.sort(key=lambda r: r["M"])
        naive = key[0] in ("torch", "cross_entropy")
        label = _nce_label(key[0], key[1]) + (f", B {key[2]}" if split_b else "")
        i = pairs.index(key[:2])  # colour: backend and pass; marker: batch size when several
        style = dict(label=label, ls="--" if naive else "-", color=f"C{i % 10}", ms=5,
                     marker=MARKERS[(all_b.index(key[2]) if split_b else i) % 10])
        left.plot([r["M"] for r in rs], [1e3 * r["median_s"] for r in rs], **style)
        if memory and any(r.get("peak_extra_bytes") is not None for r in rs):
            right.plot([r["M"] for r in rs if "peak_extra_bytes" in r],
                       [r["peak_extra_bytes"] / 2**20 for r in rs if "peak_extra_bytes" in r], **style)
        elif not memory and not naive and any(r.get("speedup_vs_naive") for r in rs):
            pts = [(r["M"], r["speedup_vs_naive"]) for r in rs if r.get("speedup_vs_naive")]
            right.plot([p[0] for p in pts], [p[1] for p in pts], **style)
    ticks = [f"{m:,}" + ("" if split_b else f"\nB = {bs_at[m][0]}") for m in ms]
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(ms, ticks)
        ax.minorticks_off()
        ax.set_xlabel("keys in the bank (M, log scale)")
        ax.grid(True, alpha=0.3)
    left.set_yscale("log")
    left.set_ylabel("median time (ms, log scale)")
    left.set_title("time per call", fontsize=10)
    left.legend(fontsize=8)
    if memory:
        right.set_yscale("symlog", linthresh=0.1)  # small banks can add nothing measurable (0 MiB)
        right.set_ylabel("peak extra memory (MiB, symlog scale)")
        right.set_title("peak memory", fontsize=10)
        right.legend(fontsize=8)
        note = ""
    else:
        _log2_speedup_axis(right, "speed-up vs naive (×, log scale)")
        right.set_title("speed-up against the naive path (no peak memory in these results)", fontsize=10)
        right.legend(fontsize=8)
        note = "these results record no peak memory: the right panel shows the speed-up instead"
    d = sorted({r["d"] for r in rows})
    fig.suptitle(f"InfoNCE on {data['machine'].get('device')}: keys {data.get('key_dtype')}, "
                 f"d = {'/'.join(map(str, d))}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig, note


def _roofline_points(name: str, data: Dict) -> Tuple[List[Tuple[str, float]], str]:
    """(label, fraction) per row that records a floor, and how the floor is defined."""
    pts = []
    how = ""
    for r in data["rows"]:
        if r.get("roofline_fraction") is not None:
            frac, how = r["roofline_fraction"], "max(FLOPs / peak matmul, bytes / copy bandwidth)"
        elif r.get("x_read_floor"):
            frac, how = 1.0 / r["x_read_floor"], "reading the inputs once"
        elif r.get("read_floor_s") and r.get("median_s"):
            frac, how = r["read_floor_s"] / r["median_s"], "reading the inputs once"
        else:
            continue
        if name == "masked_linear":
            label = f"{r['backend']} {r['op']}" + ("" if r["backend"] in ("dense", "masked") else f" ({r['kind']})")
        elif name == "structured_inference":
            label = f"{r['model']} {r['variant']}"
        elif name == "mask_threshold":
            label = f"{r['scope']} {r['backend']}"
        else:
            label = " ".join(str(r[k]) for k in ("variant", "kind", "backend", "op") if r.get(k) is not None) or "row"
        pts.append((f"{name}: {label}", frac))
    return pts, how


def roofline(results: Dict[str, Dict], suffix: str):
    names = sorted({stem[: -len(suffix)] if suffix else stem for stem in results
                    if (stem.endswith(suffix) if suffix else not stem.endswith("_quick"))})
    cats: Dict[str, List[float]] = {}
    used, left_out = [], []
    device = None
    for name in names:
        if name in NOT_KERNELS:
            continue
        data = results[name + suffix]
        pts, how = _roofline_points(name, data)
        if not pts:
            left_out.append(name)
            continue
        device = device or data["machine"].get("device")
        used.append(f"{name} ({how})")
        for label, frac in pts:
            cats.setdefault(label, []).append(frac)
    if not cats:
        raise Skip("no result file here records a roofline fraction or a read floor")
    labels = list(cats)
    fig, axes = _figure(9, 1.2 + 0.27 * len(labels))
    ax = axes[0][0]
    bench_of = [label.split(":")[0] for label in labels]
    colors = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(bench_of))}
    for y, label in enumerate(labels):
        vals = cats[label]
        ax.scatter(vals, [y] * len(vals), s=16, alpha=0.6, color=colors[bench_of[y]])
        med = sorted(vals)[len(vals) // 2]
        ax.plot([med, med], [y - 0.35, y + 0.35], color="k", lw=1.5)
    ax.axvline(1.0, color="0.3", lw=0.9, ls="--")
    ax.set_xscale("log")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("floor time / measured time (log scale; 1 = at the roofline; black bar = median)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"Roofline fraction per kernel on {device} (every measured row is a dot)", fontsize=11)
    fig.tight_layout()
    note = "floors: " + "; ".join(used) + ". Peaks are measured on the machine, so a fraction above 1 is possible."
    if left_out:
        note += (" Left out (no floor recorded, and their rows lack the FLOPs and bytes to compute one): "
                 + ", ".join(left_out) + ".")
    return fig, note


def inference_speedup(results: Dict[str, Dict], suffix: str):
    structured = results.get("structured_inference" + suffix)
    sparse = results.get("sparse_inference" + suffix)
    if not (structured and structured.get("rows")) and not (sparse and sparse.get("rows")):
        raise Skip(f"no structured_inference{suffix}.json or sparse_inference{suffix}.json with rows here")
    fig, axes = _figure(12, 4.6, ncols=2, sharey=True)
    notes = []
    for ax, data, name in ((axes[0][0], structured, "structured_inference"), (axes[0][1], sparse, "sparse_inference")):
        if not (data and data.get("rows")):
            ax.text(0.5, 0.5, f"no {name}{suffix}.json", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            notes.append(f"{name}: no results")
            continue
        groups: Dict[tuple, List[Tuple[float, float]]] = {}
        for r in data["rows"]:
            if name == "structured_inference":
                key, x = (r["model"], r["batch"], r["seq"]), r["fraction"]
                y = 1.0 if r.get("variant") == "dense" else r.get("speedup_vs_dense")
            else:
                label = f"{r['model']} {r['kind']}" if r.get("model") else r["kind"]
                key, x, y = (label, r["batch"], r["seq"]), r["sparsity"], r.get("speedup")
            if y is not None:
                groups.setdefault(key, []).append((100 * x, y))
        firsts = list(dict.fromkeys(k[0] for k in sorted(groups)))
        batches = sorted({k[1] for k in groups})
        for key, pts in sorted(groups.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{firsts.index(key[0])}",
                    marker=MARKERS[batches.index(key[1]) % 10], ms=5, ls="-" if key[1] == batches[0] else "--",
                    label=f"{key[0]}, batch {key[1]} × {key[2]}")
        _log2_speedup_axis(ax, "speed-up vs the dense model (×, log scale)" if name == "structured_inference" else "")
        if name == "structured_inference":
            ax.set_xlabel("heads and FFN neurons removed (%)")
            ax.set_title(f"structured: compacted models ({data['machine'].get('device')})", fontsize=10)
            ax.plot([90], [4.0], marker="*", color="k", ms=11, ls="none", label="target: ≥ 4× at 90%")
        else:
            ax.set_xlabel("weight sparsity of the encoder linears (%)")
            ax.set_title(f"sparse exports: {data.get('model', '')}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Pruned-model inference against the dense model (same process, median times)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig, "; ".join(notes)


PLOTS: List[Tuple[str, str, Callable]] = [
    ("masked_linear_speedup", "Masked linear: speed-up against sparsity", masked_linear_speedup),
    ("info_nce_scaling", "InfoNCE against bank size", info_nce_scaling),
    ("roofline", "Roofline fraction per kernel", roofline),
    ("inference_speedup", "Structured and sparse inference: speed-up against sparsity", inference_speedup),
]


def make_plots(results: Dict[str, Dict], out_dir: Path, suffix: str = "") -> List[Plot]:
    """Write every plot that has data to ``<out_dir>/plots/<name><suffix>.png``. Raises ImportError
    only when matplotlib is missing."""
    importlib.import_module("matplotlib")  # ImportError here: the caller says how to install it

    plots = []
    for name, title, fn in PLOTS:
        plot = Plot(name, title)
        try:
            fig, plot.note = fn(results, suffix)
            path = Path(out_dir) / "plots" / f"{name}{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path)
            plot.path = path
        except Skip as exc:
            plot.note = str(exc)
        except Exception as exc:  # a malformed result file skips its plot, never the report
            plot.note = f"failed: {type(exc).__name__}: {exc}"
        plots.append(plot)
    return plots


def plots_markdown(results: Dict[str, Dict], out_dir: Path, suffix: str = "") -> str:
    """The report's plot section: relative image links, or why a plot is not there."""
    try:
        plots = make_plots(results, out_dir, suffix)
    except ImportError:
        return "Plots need matplotlib: `pip install capkit[bench]` (or `pip install matplotlib`)."
    lines = []
    for p in plots:
        if p.path is None:
            lines += [f"- {p.title}: skipped ({p.note}).", ""]
        else:
            rel = p.path.relative_to(Path(out_dir)).as_posix()
            lines += [f"![{p.title}]({rel})", ""]
            if p.note:
                lines += [p.note[0].upper() + p.note[1:].rstrip(".") + ".", ""]
    return "\n".join(lines).strip()
