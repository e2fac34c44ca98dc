"""Build capkit and its native extension ``capkit._C``.

CMake (``CMakeLists.txt``) compiles the extension against the torch that is already
installed, so install with ``pip install --no-build-isolation .``: an isolated build
environment would fetch a different torch and produce an extension that cannot load.

- The C++ CPU kernels (OpenMP; AVX2 code paths selected at run time) are always built.
- The CUDA kernels are built when nvcc is found *and* the installed torch is a CUDA build.
  If either is missing, the build says so once and continues without them.
- A failure in any part that is built fails the install (no silent fallback).

Environment variables:
  CAPKIT_CUDA=0|1      force the CUDA part off / on (on fails loudly if it cannot be built)
  CAPKIT_CUDA_ARCHS    gencode list, default "80;90a" (plus PTX of the first, for other GPUs)
  CAPKIT_BUILD_TYPE    CMake build type, default Release
  MAX_JOBS             parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(f"[capkit build] {msg}", file=sys.stderr, flush=True)


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch
            import torch.utils.cpp_extension as cpp_ext
        except ImportError as exc:  # pragma: no cover - build-time message
            raise RuntimeError(
                "capkit's extension is compiled against the installed torch; install torch first "
                "and build with `pip install --no-build-isolation .`"
            ) from exc
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake was not found on PATH; `pip install cmake` or install it from your OS")

        want_cuda = os.environ.get("CAPKIT_CUDA", "auto").lower()
        nvcc = _find_nvcc()
        torch_cuda = torch.version.cuda is not None
        if want_cuda in ("0", "off", "false", "no"):
            with_cuda, why = False, "disabled by CAPKIT_CUDA=0"
        elif nvcc is None:
            with_cuda, why = False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        elif not torch_cuda:
            with_cuda, why = False, f"the installed torch {torch.__version__} is a CPU-only build"
        else:
            with_cuda, why = True, f"nvcc {nvcc}, torch CUDA {torch.version.cuda}"
        if want_cuda in ("1", "on", "true", "yes") and not with_cuda:
            raise RuntimeError(f"CAPKIT_CUDA=1 but the CUDA kernels cannot be built: {why}")
        _log(("building CUDA kernels: " if with_cuda else "CUDA kernels NOT built: ") + why)

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)

        device_type = "cuda" if with_cuda else "cpu"
        include_dirs = cpp_ext.include_paths(device_type=device_type)
        library_dirs = cpp_ext.library_paths(device_type=device_type)
        libs = ["c10", "torch", "torch_cpu"] + (["c10_cuda", "torch_cuda"] if with_cuda else [])
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)

        cfg = os.environ.get("CAPKIT_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCAPKIT_EXT_NAME=_C",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCAPKIT_TORCH_INCLUDE_DIRS={';'.join(include_dirs)}",
            f"-DCAPKIT_TORCH_LIBRARY_DIRS={';'.join(library_dirs)}",
            f"-DCAPKIT_TORCH_LIBRARIES={';'.join(libs)}",
            f"-DCAPKIT_CXX11_ABI={abi}",
            f"-DCAPKIT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DCAPKIT_CUDA_ARCHS={os.environ.get('CAPKIT_CUDA_ARCHS', '80;90a')}",
            f"-DCAPKIT_VERSION={self.distribution.get_version()}",
        ]
        if with_cuda:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 2)
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


setup(
    # every capkit sub-package, plus kernels/ installed as capkit.kernels, plus the benchmark
    # runner (the capkit-bench console script)
    packages=find_packages(include=["capkit", "capkit.*"]) + ["capkit.kernels", "benchmarks"],
    package_dir={"capkit": "capkit", "capkit.kernels": "kernels"},
    ext_modules=[CMakeExtension("capkit._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
