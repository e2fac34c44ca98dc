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
        assert rule["mask_kind"] in ("none", "dense", "block", "nm", "unstructured")
        if rule["mask_kind"] == "unstructured":  # the CSR inference kernel's density limit
            assert rule["mode"] == "inference" and rule["backend"] == "cpu" and rule.get("kernel") == "csr"
            assert 0.0 < float(rule["max_density"]) <= 1.0


def test_checkout_kernels_folder_does_not_shadow_the_kernels_distribution():
    # With the repository root on sys.path (python -m from a checkout), `import kernels` finds the
    # kernels/ folder (capkit.kernels). transformers 5 imports the Hugging Face `kernels` package under
    # that name; the folder must hand the name over, or fail as a missing module when there is none.
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import kernels; "
             "print(kernels.__file__); import capkit.kernels as k; print(k.__name__)")
    out = subprocess.run([sys.executable, "-c", probe, root], capture_output=True, text=True, cwd=root)
    # where `kernels` comes from outside the checkout (nowhere, without the distribution)
    real = subprocess.run([sys.executable, "-c", "import kernels; print(kernels.__file__)"],
                          capture_output=True, text=True, cwd="/")
    if real.returncode == 0:
        assert out.returncode == 0, out.stderr
        path, name = out.stdout.split()
        assert Path(path).resolve() == Path(real.stdout.strip()).resolve() != Path(root, "kernels", "__init__.py")
        assert name == "capkit.kernels"
    else:
        assert out.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in out.stderr
    # without site-packages no distribution is there: a plain ModuleNotFoundError names the module
    gone = subprocess.run([sys.executable, "-S", "-c",
                           "import sys; sys.path.insert(0, sys.argv[1])\n"
                           "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
                           "    print(e.name, 'kernels' in sys.modules)",
                           root], capture_output=True, text=True, cwd="/")
    assert gone.returncode == 0 and gone.stdout.split() == ["kernels", "False"], gone.stdout + gone.stderr
    if subprocess.run([sys.executable, "-c", "import transformers"], cwd="/").returncode == 0:
        bert = subprocess.run([sys.executable, "-c", "import transformers; transformers.BertModel; print('ok')"],
                              capture_output=True, text=True, cwd=root)
        assert bert.returncode == 0 and bert.stdout.strip() == "ok", bert.stderr[-2000:]
