"""Package surface: version, info command, compiled extension, backend choice."""
import json
import subprocess
import sys

import torch

import capkit
from capkit.ops import _backends


def test_version():
    assert capkit.__version__.count(".") == 2
    out = subprocess.run([sys.executable, "-m", "capkit.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and capkit.__version__ in out.stdout


def test_info_reports_every_backend():
    out = subprocess.run([sys.executable, "-m", "capkit.info", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert set(info["backends"]["cpu"]) == {"torch", "triton", "cuda", "cpu"}
    assert info["backends"]["cpu"]["torch"] is None
    for why in info["backends"]["cpu"].values():
        assert why is None or len(why) > 10  # unavailable backends say why


def test_extension_is_built():
    # The install must have compiled capkit._C; a silent fallback would hide a broken build.
    from capkit import _C

    info = _C.build_info()
    assert info["version"] == capkit.__version__
    assert info["openmp"] in (True, False) and info["max_threads"] >= 1


def test_auto_follows_rules(monkeypatch):
    rules = [
        {"device": "cpu", "dtype": "float32", "mask_kind": "block", "mode": "inference", "max_density": 0.5,
         "backend": "cpu"},
    ]
    monkeypatch.setattr(_backends, "dispatch_rules", lambda: rules)
    cpu = torch.device("cpu")
    assert _backends.choose_backend(cpu, torch.float32, "block", 0.1, training=False) == "cpu"
    assert _backends.choose_backend(cpu, torch.float32, "block", 0.9, training=False) == "torch"
    assert _backends.choose_backend(cpu, torch.float32, "block", 0.1, training=True) == "torch"
    assert _backends.choose_backend(cpu, torch.float64, "block", 0.1, training=False) == "torch"
    assert _backends.choose_backend(cpu, torch.float32, "dense", None, training=False) == "torch"


def test_dispatch_table_is_valid():
    for rule in _backends.dispatch_rules():
        assert rule["backend"] in _backends.BACKENDS
        assert rule["mode"] in ("training", "inference")
        assert rule["mask_kind"] in ("none", "dense", "block", "nm")
