"""Shared benchmark harness: timing, machine description, peaks, result files.

Timing: on GPUs, CUDA events around a warmed-up callable, median of repeats with the L2 flushed
between calls by rotating inputs; on CPUs, ``torch.utils.benchmark.Timer`` (median of blocked
measurements). Results are JSON under ``benchmarks/results/<device>/<name>.json`` and record
the device, versions, git commit, shapes, dtypes, medians and spread.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from capkit._io import atomic_write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_slug(device: torch.device) -> str:
    """Folder name for a device: the GPU's name, or the CPU model plus core count."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() + f"-{os.cpu_count()}c"
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-").lower()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit() -> Optional[str]:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> Dict:
    info = {
        "device": device_slug(device),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        from capkit import __version__
        from capkit._ext import build_info
        from capkit.runtime import allocator_tuning

        info["capkit"] = __version__
        info["capkit_build"] = build_info()
        info["allocator"] = allocator_tuning() or "C library defaults"
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_sms"] = props.multi_processor_count
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            q = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if q.returncode == 0:
                driver, sm, sm_max, mem = [s.strip() for s in q.stdout.splitlines()[0].split(",")]
                info.update(driver=driver, sm_clock=sm, sm_clock_max=sm_max, mem_clock=mem)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    return info


MIN_SAMPLES = 5  # timed calls behind every CPU median, however long one call takes


def time_fn(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.5) -> Dict[str, float]:
    """Median / spread of one call of ``fn`` in seconds."""
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
        # Calibrate the number of repeats to ~min_run_time.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 1e3, 1e-6)
        reps = int(min(200, max(5, min_run_time / est)))
        cache = torch.empty(64 * 2**20, dtype=torch.int8, device=device)  # flushes the 50 MB L2
        times = []
        for _ in range(reps):
            cache.zero_()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        import torch.utils.benchmark as tb

        fn()
        timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        times = list(timer.blocked_autorange(min_run_time=min_run_time).times)
        # a call longer than min_run_time gives one or two samples: take a median of at least
        # MIN_SAMPLES single calls, so one slow call on a shared machine does not make the figure
        while len(times) < MIN_SAMPLES:
            times.append(timer.timeit(1).times[0])
    times.sort()
    q1 = times[len(times) // 4]
    q3 = times[(3 * len(times)) // 4]
    return {"median_s": statistics.median(times), "iqr_s": q3 - q1, "min_s": times[0], "n": len(times)}


def cpu_peak_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory one call of ``fn`` adds on top of what the process holds before it:
    Linux's high-water mark (``VmHWM``) reset through ``/proc/self/clear_refs`` just before the
    call. None where that is not available. Call ``fn`` once before (warm-up), so lazily
    created state is not counted."""
    def status() -> Dict[str, int]:
        out = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
        return out

    try:  # hand freed heap memory back first, so that the call's allocations show in the RSS
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark := current RSS
        before = status()["VmRSS"]
    except (OSError, KeyError, ValueError):
        return None
    fn()
    try:
        return max(0, status()["VmHWM"] - before)
    except (OSError, KeyError, ValueError):
        return None


def measure_peaks(device: torch.device) -> Dict[str, float]:
    """Peak matmul rate (large matmul) and copy bandwidth for the roofline: measured once per
    device and process (``python -m benchmarks`` shares them among all its benchmarks)."""
    key = str(torch.device(device))
    if key not in _PEAKS:
        _PEAKS[key] = _measure_peaks(torch.device(device))
    return dict(_PEAKS[key])


_PEAKS: Dict[str, Dict[str, float]] = {}


def _measure_peaks(device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)  # preallocated: time the matmul, not page faults
    t = time_fn(lambda: torch.mm(a, b, out=c), device)["median_s"]
    flops = 2 * n**3 / t
    numel = (512 if device.type == "cuda" else 64) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    tc = time_fn(lambda: dst.copy_(src), device)["median_s"]
    return {"matmul_flops": flops, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_bytes_per_s": 2 * numel * 4 / tc}


def roofline_fraction(seconds: float, flops: float, bytes_moved: float, peaks: Dict[str, float]) -> float:
    floor = max(flops / peaks["matmul_flops"], bytes_moved / peaks["copy_bytes_per_s"])
    return floor / seconds if seconds > 0 else float("nan")


def write_results(name: str, device: torch.device, payload: Dict, out_dir: Optional[Path] = None) -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out_dir / f"{name}.json", json.dumps(payload, indent=1, default=str))


def publish(name: str, device: torch.device, payload: Dict, markdown: str, quick: bool = False,
            out_dir: Optional[Path] = None) -> Path:
    """Write ``<name>[_quick].json`` and its markdown summary next to it, print both places."""
    path = write_results(name + ("_quick" if quick else ""), device, payload, out_dir)
    atomic_write_text(path.with_suffix(".md"), markdown)
    print(markdown)
    print(f"results: {path}")
    return path


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime: what a user deploys a dense model with on a CPU, the baseline beside torch dense
# ---------------------------------------------------------------------------------------------
ORT_MISSING_NOTE = ("onnxruntime (or onnx) is not installed, so the ONNX Runtime baseline is left out: "
                    "pip install 'capkit[bench]'")


def onnxruntime_info() -> Dict:
    """{"onnxruntime": version} or {"onnxruntime": None, "onnxruntime_note": why it is missing}."""
    from capkit.onnx_export import onnx_missing_reason

    reason = onnx_missing_reason()
    if reason is not None:
        return {"onnxruntime": None, "onnxruntime_note": ORT_MISSING_NOTE}
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


class OrtBaseline:
    """A model exported through ``torch.onnx`` (masks folded) and run in an ONNX Runtime CPU
    session with ``intra_op_num_threads`` = torch's threads, one inter-op thread and every graph
    optimisation; ``call(inputs)`` gives a callable for the timers."""

    def __init__(self, model, folder: Path, threads: Optional[int] = None):
        from capkit.onnx_export import export_graph, ort_session, plain_copy

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / "model.onnx"
        export_graph(plain_copy(model), self.file)
        self.threads = int(threads or torch.get_num_threads())
        self.session = ort_session(self.file, self.threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feeds(self, inputs: Dict[str, torch.Tensor]) -> Dict:
        ids = inputs["input_ids"]
        full = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids), **inputs}
        return {n: full[n].cpu().numpy() for n in self.input_names}

    def call(self, inputs: Dict[str, torch.Tensor]) -> Callable[[], None]:
        feeds = self.feeds(inputs)
        session = self.session

        def run() -> None:
            session.run(None, feeds)

        return run


def ort_baseline_or_none(model, folder: Path, failures: Optional[List[Dict]] = None, **context):
    """An :class:`OrtBaseline`, or None (with the reason in ``failures``) when ONNX Runtime is
    missing or the export fails."""
    if onnxruntime_info()["onnxruntime"] is None:
        print(ORT_MISSING_NOTE, file=sys.stderr)
        return None
    try:
        return OrtBaseline(model, folder)
    except Exception as exc:  # the benchmark reports the failure and goes on with torch alone
        if failures is not None:
            failures.append({**context, "error": f"ONNX Runtime baseline: {type(exc).__name__}: {exc}"[:300]})
        return None


def add_allocator_argument(parser) -> None:
    """``--allocator {tuned,default}`` for the CPU inference benchmarks."""
    parser.add_argument("--allocator", choices=("tuned", "default"), default="tuned",
                        help="tuned (default): capkit.tune_cpu_allocator() keeps freed memory for reuse, "
                             "for every model timed in the process (torch dense, the pruned export; ONNX "
                             "Runtime has its own arena either way); default: the C library's settings")


def apply_allocator(choice: str, device: torch.device) -> None:
    if choice == "tuned" and device.type == "cpu":
        from capkit.runtime import tune_cpu_allocator

        if not tune_cpu_allocator():
            print("[benchmark] the C library is not glibc: --allocator tuned changes nothing here", file=sys.stderr)


def allocator_text(machine: Dict) -> str:
    a = machine.get("allocator")
    if isinstance(a, dict):
        return (f"allocator: {a['allocator']}, freed memory kept for reuse (trim and mmap thresholds "
                f"{a['trim_threshold'] >> 20} MiB, capkit.tune_cpu_allocator)")
    return f"allocator: {a or 'not recorded'}"
