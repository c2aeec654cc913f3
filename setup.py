"""Build of orca-kernels' compiled extension, orca_kernels._C (package metadata: pyproject.toml).

- A CUDA build (CPU + CUDA kernels) wherever nvcc and a CUDA build of torch are both present,
  even without a GPU; otherwise a CPU-only build, said once. With no C++ compiler at all the
  package installs without _C and orca_kernels says so at import.
- Knobs: ORCA_SKIP_CUDA_BUILD=1 (CPU-only build), ORCA_CUDA_ARCHS (default "80;90"),
  MAX_JOBS (default: what the cores and memory allow, ~8 GiB per compile job).
- torch must be importable at build time. With an existing torch, install with
  `pip install --no-build-isolation -e .` so that _C is built against that torch.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def log(message: str) -> None:
    print(f"[orca-kernels] {message}", file=sys.stderr)


def default_environment() -> None:
    # torch's cpp_extension reads CUDA_HOME at import; `nvcc` on PATH may be a wrapper script.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        for candidate in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = candidate
    if "MAX_JOBS" not in os.environ:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(memory_gib // 8))))


def nvidia_wheel_dirs(subdir: str, pattern: str) -> list[str]:
    """Folders of the pip-installed NVIDIA wheels (nvidia/cu13/include, nvidia/cublas/lib, ...)
    holding `pattern`: a minimal CUDA toolkit lacks cusparse.h and cuBLAS, which torch's headers
    and our executor need."""
    found = []
    for site in sys.path:
        for path in glob.glob(os.path.join(site, "nvidia", "**", subdir, pattern), recursive=True):
            folder = os.path.dirname(path)
            if folder not in found:
                found.append(folder)
    return found


def cublas_link_args(cuda_home: str) -> list[str]:
    folders = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")] + nvidia_wheel_dirs(
        "lib", "libcublas.so*"
    )
    for folder in folders:
        libraries = sorted(glob.glob(os.path.join(folder, "libcublas.so*")))
        if libraries:
            name = os.path.basename(libraries[0])
            return [f"-L{folder}", "-lcublas" if name == "libcublas.so" else f"-l:{name}"]
    raise RuntimeError(
        "orca-kernels: nvcc and a CUDA torch were found but not libcublas; install the CUDA toolkit's "
        "cuBLAS or set ORCA_SKIP_CUDA_BUILD=1 for a CPU-only build"
    )


def extensions():
    default_environment()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        log(
            f"no C++ compiler ({compiler}) found: installing without orca_kernels._C "
            "(the extension backend will be unavailable)"
        )
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        raise RuntimeError(
            "orca-kernels needs torch at build time: `pip install torch`, then `pip install --no-build-isolation -e .`"
        ) from error

    sources = [os.path.join("csrc", "strided_conv1d.cpp")]
    cxx_flags = ["-O3"]  # the C++ standard is the one torch's cpp_extension picks for its headers
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    skip = os.environ.get("ORCA_SKIP_CUDA_BUILD", "0") == "1"
    if skip or torch.version.cuda is None or nvcc is None or not os.path.exists(nvcc):
        reason = (
            "ORCA_SKIP_CUDA_BUILD=1"
            if skip
            else "torch is a CPU build"
            if torch.version.cuda is None
            else "nvcc not found (set CUDA_HOME)"
        )
        log(f"building orca_kernels._C for the CPU only ({reason})")
        extension = cpp_extension.CppExtension("orca_kernels._C", sources, extra_compile_args=cxx_flags)
    else:
        archs = [a.strip() for a in os.environ.get("ORCA_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        arch_flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        log(f"building orca_kernels._C for the CPU and CUDA (nvcc {nvcc}, archs {';'.join(archs)})")
        include_dirs = nvidia_wheel_dirs("include", "cusparse.h") + nvidia_wheel_dirs("include", "cublas_v2.h")
        extension = cpp_extension.CUDAExtension(
            "orca_kernels._C",
            sources + [os.path.join("csrc", "conv1d_cuda.cu")],
            include_dirs=sorted(set(include_dirs)),
            define_macros=[("ORCA_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *arch_flags]},
            extra_link_args=cublas_link_args(cuda_home),
        )
    return [extension], {
        "build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    }


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
