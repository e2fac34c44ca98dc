"""The performance targets (design/performance.md) checked against a results folder, and the
accuracy of the CAP pruning runs kept there.

``load_results(folder)`` reads every ``<name>[_quick].json``; ``evaluate(results)`` gives one row
per target: the measured value, the goal, met / not met and by how much, the device and the rows
it came from. A target is judged only on rows of its own shape, dtype and device; otherwise it
is "not measured" and the nearest measured case, if any, is shown labelled as such. Where a
target covers several measured cases (both FFN shapes, several keeps or batch sizes) the worst
case is judged, taking capkit's best backend per case. ``accuracy_rows(folder)`` collects the
``*/report.json`` files that ``capkit-prune`` writes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from benchmarks.harness import markdown_table

FAST = ("cpu", "triton", "cuda")  # capkit's own masked-linear / InfoNCE backends
NAIVE_NCE = ("torch", "cross_entropy")
BERT_BASE_STEP = {"layers": 12, "hidden": 768, "ffn": 3072, "batch": 32, "seq": 128}


def load_results(folder: Path) -> Tuple[Dict[str, Dict], List[str]]:
    """``{file stem: result}`` for the benchmark JSON files directly in ``folder``, and one line
    per file that could not be read."""
    results: Dict[str, Dict] = {}
    problems: List[str] = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: unreadable ({type(exc).__name__}: {exc})")
            continue
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            results[path.stem] = data
    return results, problems


def result_files(results: Dict[str, Dict], name: str) -> List[Tuple[str, Dict]]:
    """The full run's results of benchmark ``name`` first, then the quick run's."""
    return [(f"{stem}.json", results[stem]) for stem in (name, name + "_quick") if stem in results]


@dataclass
class Found:
    """What one results file says about a target."""
    value: float
    where: str  # the rows (and their shape / dtype) the value comes from
    exact: bool = True  # False: not the target's shape / dtype; shown as "nearest measured"
    alt: Optional[float] = None  # the same figure from the fastest samples: judged too, must agree


@dataclass
class Target:
    name: str
    goal: float
    higher: bool  # True: value >= goal meets it
    unit: str  # "x" (a ratio) or "%" (a fraction, compared in percentage points)
    benchmark: str
    devices: Tuple[str, ...]  # device types the target is about
    measure: Callable[[Dict], Optional[Found]]
    why_not: str = ""  # why it cannot be measured on other devices


def _close(a, b) -> bool:
    return a is not None and b is not None and abs(float(a) - float(b)) < 1e-6


def _worst_of_best(cases: Dict[tuple, List[Tuple[float, str]]],
                   higher: bool) -> Optional[Tuple[float, tuple, str, int]]:
    """Per case the best (value, backend); over cases the worst. Returns (value, case, backend, count)."""
    if not cases:
        return None
    best = {c: (max if higher else min)(vals) for c, vals in cases.items()}
    case = (min if higher else max)(best, key=lambda c: best[c][0])
    return best[case][0], case, best[case][1], len(best)


def _fmt(v: float, unit: str) -> str:
    return f"{100 * v:.1f}%" if unit == "%" else f"{v:.2f}×"


# ---------------------------------------------------------------- masked linear
def _masked_linear(op: str, kinds: Iterable[str], sparsity: float, metric: str, backends=FAST,
                   shapes: Optional[Iterable[str]] = None, dtype: Optional[str] = "bfloat16",
                   tokens: Optional[int] = 4096, threads: Optional[int] = None,
                   block_sizes: Optional[Tuple[int, ...]] = (32, 64)) -> Callable[[Dict], Optional[Found]]:
    kinds = tuple(kinds)

    def measure(data: Dict) -> Optional[Found]:
        cases: Dict[tuple, List[Tuple[float, str]]] = {}
        for r in data["rows"]:
            if (r.get("backend") in backends and r.get("op") == op and r.get("kind") in kinds
                    and _close(r.get("sparsity"), sparsity) and (shapes is None or r.get("shape") in shapes)
                    and r.get(metric) is not None):
                if r.get("kind") == "block" and block_sizes and r.get("block_size") not in block_sizes:
                    continue
                cases.setdefault((r["shape"], r["kind"]), []).append((r[metric], r["backend"]))
        got = _worst_of_best(cases, True)
        if got is None:
            return None
        value, (shape, kind), backend, n = got
        dt = data.get("dtype")
        exact = (dtype is None or dt == dtype) and (tokens is None or data.get("tokens") == tokens)
        if threads is not None and data["machine"].get("torch_threads") != threads:
            exact = False
        block = f" {data.get('block_size')}×{data.get('block_size')}" if kind == "block" else ""
        where = (f"worst of {n} case(s): {shape}, {kind}{block} mask, `{backend}` backend; {dt}, "
                 f"{data.get('tokens')} tokens")
        if data["machine"].get("device_type") == "cpu":
            where += f", {data['machine'].get('torch_threads')} threads"
        return Found(value, where, exact)
    return measure


# ---------------------------------------------------------------- mask threshold
def _threshold(data: Dict) -> Optional[Found]:
    cases: Dict[tuple, List[Tuple[float, str]]] = {}
    matrices = None
    for r in data["rows"]:
        if r.get("scope") == "per-matrix" and r.get("op") == "threshold" and r.get("speedup_vs_sort") is not None:
            cases.setdefault((r["keep"],), []).append((r["speedup_vs_sort"], r["backend"]))
            matrices = r.get("matrices")
    got = _worst_of_best(cases, True)
    if got is None:
        return None
    value, (keep,), backend, n = got
    shape = "72 BERT-base matrices" if matrices == 72 else f"{matrices} small matrices (quick shapes)"
    return Found(value, f"per-matrix thresholds of {shape}, worst of {n} keep(s): keep {keep}, `{backend}`",
                 exact=matrices == 72)


# ---------------------------------------------------------------- InfoNCE
def _nce_large(data: Dict) -> Optional[Found]:
    cases: Dict[tuple, List[Tuple[float, str]]] = {}
    for r in data["rows"]:
        if (r.get("backend") not in NAIVE_NCE and r.get("op") == "forward+backward"
                and r.get("speedup_vs_naive") is not None):
            cases.setdefault((r["B"], r["M"]), []).append((r["speedup_vs_naive"], r["backend"]))
    large = {c: v for c, v in cases.items() if c[1] >= 65536}
    got = _worst_of_best(large or cases, True)
    if got is None:
        return None
    value, (b, m), backend, n = got
    return Found(value, f"forward+backward, worst of {n} shape(s) with a naive baseline: B {b}, M {m:,}, "
                        f"`{backend}`; keys {data.get('key_dtype')}", exact=bool(large))


def _nce_floor(data: Dict) -> Optional[Found]:
    cap = [r for r in data["rows"] if (r.get("B"), r.get("M"), r.get("d")) == (32, 4200, 768)
           and r.get("backend") not in NAIVE_NCE and r.get("x_read_floor") is not None]
    fb = [r for r in cap if r["op"] == "forward+backward"]
    if not fb:
        return None
    best = min(fb, key=lambda r: r["x_read_floor"])
    fo = [r["x_read_floor"] for r in cap if r["op"] == "forward" and r["backend"] == best["backend"]]
    alone = f" (forward alone {min(fo):.2f}×)" if fo else ""
    where = (f"B 32, M 4,200, d 768, forward+backward time / time to read the keys once, "
             f"`{best['backend']}`{alone}; keys {data.get('key_dtype')}")
    peak = (data.get("peaks") or {}).get("matmul_flops")
    if peak:
        # forward+backward computes the scores twice and dq once: 3 x 2BMd flops at the matmul peak
        compute_s = 6 * 32 * 4200 * 768 / peak
        read_s = best["median_s"] / best["x_read_floor"]
        if compute_s > read_s:
            where += (f". On this device the matmul peak makes computing cost more than reading: compute floor "
                      f"{1e3 * compute_s:.2f} ms = {compute_s / read_s:.1f}× the read floor, measured "
                      f"{best['median_s'] / compute_s:.2f}× the compute floor")
    return Found(best["x_read_floor"], where)


def _nce_memory(data: Dict) -> Optional[Found]:
    rows = [r for r in data["rows"] if r.get("backend") not in NAIVE_NCE and r.get("peak_extra_bytes") is not None]
    if not rows:
        return None
    top = max(r["B"] * r["M"] for r in rows)
    worst = max((r for r in rows if r["B"] * r["M"] == top), key=lambda r: r["peak_extra_bytes"])
    frac = worst["peak_extra_bytes"] / (4 * top)
    return Found(frac, f"peak extra memory {worst['peak_extra_bytes'] / 2**20:.1f} MiB at B {worst['B']}, "
                       f"M {worst['M']:,} ({worst['op']}, `{worst['backend']}`) as a fraction of one fp32 B×M "
                       f"logits matrix" + ("" if data["machine"].get("device_type") == "cuda" else
                                           "; CPU: the resident high-water mark of one warm call"))


# ---------------------------------------------------------------- training step
def _step(key: str) -> Callable[[Dict], Optional[Found]]:
    def measure(data: Dict) -> Optional[Found]:
        value = (data.get("summary") or {}).get(key)
        if value is None:
            return None
        shape = data.get("shape") or {}
        exact = all(shape.get(k) == v for k, v in BERT_BASE_STEP.items())
        desc = (f"{shape.get('layers')} layers × {shape.get('hidden')} hidden, batch {shape.get('batch')} × "
                f"{shape.get('seq')} tokens" if shape else "shape not recorded")
        dtypes = sorted({str(r.get("dtype")) for r in data["rows"] if r.get("dtype")})
        what = "reference / capkit step time" if key == "speedup_vs_reference" else "capkit / kd step time − 1"
        fastest = {r.get("variant"): r.get("min_ms") for r in data["rows"]}
        other = "reference" if key == "speedup_vs_reference" else "kd"
        alt = None
        if fastest.get("capkit") and fastest.get(other):
            alt = (fastest[other] / fastest["capkit"] if key == "speedup_vs_reference"
                   else fastest["capkit"] / fastest[other] - 1.0)
        where = f"{what}, medians; {desc}" + (f"; {', '.join(dtypes)}" if dtypes else "")
        if alt is not None:
            where += f"; from the fastest steps {alt:.2f}×" if key == "speedup_vs_reference" else \
                f"; from the fastest steps {100 * alt:.1f}%"
        if key == "speedup_vs_reference":
            where += _step_bound(data)
        return Found(value, where, exact, alt)
    return measure


def _step_bound(data: Dict) -> str:
    """What the speed-up over the reference's way can reach on this device: the reference's
    extra work is mostly its mask update (a full sort per matrix); the rest of its step is the
    same matmuls every variant runs. With capkit's mask update in place of the reference's and
    every other phase as the reference measured it, the speed-up would be this bound."""
    phases = ("mask_update", "teacher_forward", "student_forward", "contrastive", "backward", "optimizer")
    by = {r.get("variant"): r for r in data["rows"]}
    ref, cap = by.get("reference"), by.get("capkit")
    if not ref or not cap or any(ref.get(k) is None for k in phases) or cap.get("mask_update") is None:
        return ""
    total = sum(ref[k] for k in phases)
    bound = total / (total - ref["mask_update"] + cap["mask_update"])
    return (f". The reference's mask update is {100 * ref['mask_update'] / total:.0f}% of its phases; with "
            f"capkit's mask update and the reference's other phases the speed-up would be {bound:.2f}× "
            f"(phase sums), so on this device the matmuls every variant runs bound it there")


# ---------------------------------------------------------------- structured
def _structured(data: Dict) -> Optional[Found]:
    cases: Dict[str, Dict[tuple, List[Tuple[float, str]]]] = {}
    for r in data["rows"]:
        if r.get("variant") == "compacted" and _close(r.get("fraction"), 0.9) and r.get("speedup_vs_dense"):
            cases.setdefault(r["model"], {}).setdefault((r["batch"], r["seq"]), []).append((r["speedup_vs_dense"], ""))
    model = "bert-base" if "bert-base" in cases else next(iter(cases), None)
    got = _worst_of_best(cases.get(model, {}), True)
    if got is None:
        return None
    value, (b, s), _, n = got
    threads = f", {data['machine'].get('torch_threads')} threads" if data["machine"].get("device_type") == "cpu" else ""
    return Found(value, f"{model}, 90% of heads and FFN neurons removed, worst of {n} shape(s): batch {b} × {s} "
                        f"tokens; {data.get('dtype')}{threads}", exact=model == "bert-base")



# ---------------------------------------------------------------- accuracy (issue targets of the CAP loop)
def _accuracy_group(data: Dict, method: str, target: float = 0.9) -> Optional[Dict]:
    """The (task, method) group of ``method`` at ``target`` sparsity: SST-2 with ≥ 3 seeds first."""
    groups = [g for g in data.get("groups") or []
              if g.get("method", "").partition("@")[0] == method and "+" not in g.get("method", "")
              and g.get("sparsity_mean") is not None
              and abs(g["sparsity_mean"] - target) < 0.01]
    groups.sort(key=lambda g: (g.get("task") != "sst2", -(g.get("n") or 0)))
    return groups[0] if groups else None


def _exact(g: Dict) -> bool:
    return g.get("task") == "sst2" and (g.get("n") or 0) >= 3


def _kept(data: Dict) -> Optional[Found]:
    g = _accuracy_group(data, "cap-m")
    if g is None or g.get("kept_mean") is None:
        return None
    std = "" if g.get("kept_std") is None else f" ± {100 * g['kept_std']:.1f}"
    return Found(g["kept_mean"], f"{g['task']}, {g.get('model')}, {g['method']} at {100 * g['sparsity_mean']:.1f}% "
                                 f"sparsity, pruned / teacher dev metric{std} over {g['n']} seed(s), "
                                 f"{g.get('train_examples')} training examples", exact=_exact(g))


def _margin(data: Dict) -> Optional[Found]:
    g = _accuracy_group(data, "cap-m")
    if g is None:
        return None
    c = next((c for c in data.get("comparisons") or []
              if c.get("task") == g["task"] and c.get("method") == g["method"]), None)
    if c is None or not c.get("spread"):
        return None
    return Found(c["margin"] / c["spread"], f"{c['task']}: {c['method']} − {c['baseline']} = "
                                            f"{100 * c['margin']:+.2f} points, larger seed std "
                                            f"{100 * c['spread']:.2f} points, {c['n']} seeds", exact=_exact(g))

GPU = ("cuda",)
ANY = ("cuda", "cpu")
ML_WHY = "bf16 masked linear against cuBLAS needs a GPU"
TARGETS: List[Target] = [
    Target("Masked linear 768↔3072, 4096 tokens, bf16: fused forward+backward at 0% sparsity vs "
           "`F.linear(x, W*M)` + autograd", 1.05, True, "x", "masked_linear", GPU,
           _masked_linear("forward+backward", ("unstructured", "block"), 0.0, "speedup_vs_masked",
                          shapes=("bert-ffn-in", "bert-ffn-out")), ML_WHY),
    Target("Masked linear 768↔3072, 4096 tokens, bf16: 90% block-sparse (32/64) forward vs dense "
           "(80% of the 2.5× floor)", 2.0, True, "x", "masked_linear", GPU,
           _masked_linear("forward", ("block",), 0.9, "speedup_vs_dense", shapes=("bert-ffn-in", "bert-ffn-out")),
           ML_WHY),
    Target("Masked linear 768↔3072, 4096 tokens, bf16: 90% block-sparse (32/64) forward+backward vs dense",
           1.6, True, "x", "masked_linear", GPU,
           _masked_linear("forward+backward", ("block",), 0.9, "speedup_vs_dense",
                          shapes=("bert-ffn-in", "bert-ffn-out")), ML_WHY),
    Target("Mask threshold (top-k per matrix), all 72 BERT-base matrices, vs a full sort", 10.0, True, "x",
           "mask_threshold", ANY, _threshold),
    Target("InfoNCE: no O(B·M) memory (peak extra memory < 10% of one B×M logits matrix)", 0.10, False, "%",
           "info_nce", ANY, _nce_memory),
    Target("InfoNCE at M ≥ 64k keys vs the naive PyTorch path (forward+backward)", 1.5, True, "x", "info_nce",
           ANY, _nce_large),
    Target("InfoNCE at CAP's shape (32 × 4,200 × 768): within 2× of the keys' read floor", 2.0, False, "x",
           "info_nce", ANY, _nce_floor),
    Target("CAP-m training step, BERT-base, batch 32 × 128: vs the reference's way", 1.5, True, "x",
           "train_step", ANY, _step("speedup_vs_reference")),
    Target("CAP-m training step, BERT-base, batch 32 × 128: overhead over plain KD fine-tuning", 0.10, False, "%",
           "train_step", ANY, _step("overhead_vs_kd")),
    Target("Structured: 90% of heads/neurons removed, inference vs the dense model (GPU and CPU)", 4.0, True, "x",
           "structured_inference", ANY, _structured),
    Target("CPU: C++ masked-linear inference at 90% block sparsity vs dense `F.linear`, fp32, 2 cores", 3.0,
           True, "x", "masked_linear", ("cpu",),
           _masked_linear("forward", ("block",), 0.9, "speedup_vs_dense", backends=("cpu",), dtype="float32",
                          tokens=None, threads=2, block_sizes=None), "a CPU target"),
    Target("Accuracy, SST-2 (≥ 3 seeds): cap-m at 90% sparsity keeps this much of the teacher's dev accuracy",
           0.97, True, "%", "accuracy", ANY, _kept),
    Target("Accuracy, SST-2 (≥ 3 seeds): cap-m's margin over movement + KD at 90%, in units of the seeds' "
           "spread (larger standard deviation)", 1.0, True, "x", "accuracy", ANY, _margin),
]


def _judge(t: Target, value: float) -> Tuple[str, str]:
    met = value >= t.goal if t.higher else value <= t.goal
    if t.unit == "%":
        margin = f"{100 * (value - t.goal):+.1f} pp"
    else:
        margin = f"{value / t.goal:.2f}× the {'goal' if t.higher else 'limit'}"
    return ("met" if met else "**not met**"), margin


def evaluate(results: Dict[str, Dict], targets: List[Target] = TARGETS) -> List[Dict]:
    """One row per target: target, goal, measured, verdict, margin, device, source."""
    rows = []
    for t in targets:
        files = result_files(results, t.benchmark)
        goal = f"{100 * t.goal:g}%" if t.unit == "%" else f"{t.goal:g}×"
        row = {"target": t.name, "goal": ("≥ " if t.higher else "≤ ") + goal, "measured": "—", "verdict": "",
               "margin": "", "device": files[0][1].get("machine", {}).get("device", "?") if files else "", "source": ""}
        nearest = other_device = None
        try:
            for fname, data in files:
                found = t.measure(data)
                if found is None:
                    continue
                if data.get("machine", {}).get("device_type") not in t.devices:
                    other_device = other_device or (fname, data, found)
                elif found.exact:
                    row.update(measured=_fmt(found.value, t.unit), device=data["machine"].get("device", "?"),
                               source=f"{fname}: {found.where}")
                    row["verdict"], row["margin"] = _judge(t, found.value)
                    if found.alt is not None and _judge(t, found.alt)[0] != row["verdict"]:
                        # the machine's noise spans the goal: the median and the fastest samples disagree
                        row["verdict"] = (f"not resolved (median {_fmt(found.value, t.unit)}, fastest samples "
                                          f"{_fmt(found.alt, t.unit)})")
                    break
                else:
                    nearest = nearest or (fname, data, found)
            else:
                if not files:
                    row["verdict"] = f"not measured: no {t.benchmark} results here"
                elif not any(d.get("machine", {}).get("device_type") in t.devices for _, d in files):
                    row["verdict"] = "not measured on this device" + (f" ({t.why_not})" if t.why_not else "")
                elif nearest is not None:
                    row["verdict"] = "not measured at the target's shape / dtype"
                else:
                    row["verdict"] = "not measured: no matching rows in " + ", ".join(f for f, _ in files)
                if nearest or other_device:
                    fname, data, found = nearest or other_device
                    row["device"] = data["machine"].get("device", "?")
                    row["source"] = (f"nearest measured (not judged): {_fmt(found.value, t.unit)}; "
                                     f"{fname}: {found.where}")
        except Exception as exc:  # a malformed file is reported in the table, not raised
            row["verdict"] = f"could not evaluate: {type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def targets_markdown(results: Dict[str, Dict]) -> str:
    rows = evaluate(results)
    return ("Targets of the design notes (`design/performance.md`), judged on the result files in this folder "
            "(a full run's file before a quick run's). Where a target covers several cases the worst case is "
            "judged, with capkit's best backend per case; a target is judged only at its own shape, dtype "
            "and device, otherwise the nearest measured case is shown, not judged.\n\n"
            + markdown_table(rows, ["target", "goal", "measured", "verdict", "margin", "device", "source"]))


# ---------------------------------------------------------------- accuracy
def _metric(metrics: Optional[Dict]) -> Tuple[str, Optional[float]]:
    """The name and value of a metrics dict's main metric."""
    if not metrics or metrics.get("main") is None:
        return "main", None
    main = metrics["main"]
    name = next((k for k, v in metrics.items() if k != "main" and v == main), "main")
    return name, main


def accuracy_rows(folder: Path) -> Tuple[List[Dict], List[str]]:
    """One row per ``<folder>/*/report.json`` of a CAP pruning run (and per run of
    ``benchmarks.accuracy``: ``accuracy_runs*/<task>/<method>/report.json``), and one line per
    unreadable file."""
    rows, problems = [], []
    folder = Path(folder)
    for path in sorted(folder.glob("*/report.json")) + sorted(folder.glob("accuracy_runs*/**/report.json")):
        try:
            rep = json.loads(path.read_text())
            name, dense = _metric((rep.get("dense") or {}).get("metrics"))
            pruned_name, pruned = _metric((rep.get("pruned") or {}).get("metrics"))
            name = name if dense is not None else pruned_name
            lat = rep.get("latency") or {}
            sp = (rep.get("pruned") or {}).get("sparsity")
            run = path.parent.relative_to(folder).as_posix()
            rows.append({
                "run": f"[{run}]({run}/report.md)" if path.with_suffix(".md").exists() else run,
                "task": rep.get("task", "?"), "model": rep.get("model", "?"), "method": rep.get("method", "?"),
                "sparsity": f"{100 * sp:.1f}%" if sp is not None else "-", "metric": name,
                "dense": f"{dense:.4f}" if dense is not None else "-",
                "pruned": f"{pruned:.4f}" if pruned is not None else "-",
                "drop": f"{100 * (dense - pruned):.1f} pp" if None not in (dense, pruned) else "-",
                "speed-up": (f"{lat['speedup']:.2f}× ({lat.get('format')} export, batch {lat.get('batch')} × "
                             f"{lat.get('seq')})" if lat.get("speedup") else "-"),
                "device": str(rep.get("device", "?")) + (f", {lat['threads']} threads" if lat.get("threads") else ""),
            })
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            problems.append(f"{path.relative_to(folder).as_posix()}: unreadable ({type(exc).__name__}: {exc})")
    return rows, problems


def accuracy_markdown(folder: Path) -> str:
    rows, problems = accuracy_rows(folder)
    if not rows:
        text = ("No CAP pruning runs here (`capkit-prune` writes `report.json`: copy its output folder into this "
                "one).")
    else:
        text = ("CAP pruning runs (`*/report.json` written by `capkit-prune`): main dev metric of the dense "
                "teacher and of the pruned model; speed-up of the exported model against the dense one, same "
                "process.\n\n" + markdown_table(rows, ["run", "task", "model", "method", "sparsity", "metric",
                                                       "dense", "pruned", "drop", "speed-up", "device"]))
    return text + "".join(f"\n\n- skipped {p}" for p in problems)
