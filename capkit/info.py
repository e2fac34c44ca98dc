"""``python -m capkit.info`` / ``capkit-info``: which backends run on this machine, and why not."""
from __future__ import annotations

import argparse
import json
import platform
import sys


def collect() -> dict:
    import torch

    from capkit import __version__
    from capkit._ext import build_info, extension_error
    from capkit.ops import backend_status

    info = {
        "capkit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "extension": build_info() or {"error": extension_error()},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info["backends"] = {dev: backend_status(torch.device(dev)) for dev in devices}
    if not torch.cuda.is_available():
        info["backends"]["cuda"] = {"all": "no CUDA device is visible to torch"
                                    + ("" if torch.version.cuda else " (CPU-only torch build)")}
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="capkit-info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"capkit {info['capkit']}  (python {info['python']}, torch {info['torch']}, "
          f"triton {info['triton'] or 'not installed'})")
    ext = info["extension"]
    if "error" in ext:
        print(f"compiled extension: NOT available: {ext['error']}")
    else:
        print(f"compiled extension: built for torch {ext['torch_version_built']}; CUDA kernels: "
              f"{'yes' if ext['cuda'] else 'no'}; OpenMP: {'yes' if ext['openmp'] else 'no'} "
              f"({ext['max_threads']} threads); AVX2+FMA: {'yes' if ext['avx2'] else 'no'}; CPU attention "
              f"kernel: {'vectorised (AVX-512)' if ext.get('attention_vectorised') else 'not used (no AVX-512)'}")
    if info.get("gpu"):
        print(f"GPU: {info['gpu']} (CUDA {info['torch_cuda']})")
    for dev, status in info["backends"].items():
        print(f"backends on {dev}:")
        for name, why in status.items():
            print(f"  {name:7s} {'available' if why is None else 'unavailable: ' + why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
