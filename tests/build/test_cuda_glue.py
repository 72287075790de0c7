"""The CUDA half of the torch glue (`*_api.cpp` under SEQKERN_WITH_CUDA) compiles.

On a CPU-only machine that code is never built, so a typo there would first show up on a GPU
machine. This syntax-checks it with g++ against the installed torch's headers and the CUDA
runtime headers next to nvcc. The one header a CPU torch lacks (c10's generated CUDA cmake
macros) is stubbed.
"""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[2]
API_FILES = sorted((ROOT / "csrc").rglob("*_api.cpp"))


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent / "include"] if nvcc else []
    candidates.append(Path("/usr/local/cuda/include"))
    for c in candidates:
        if (c / "cuda_runtime_api.h").exists():
            return c
    return None


@pytest.mark.parametrize("api", API_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_glue_compiles(api, tmp_path):
    cuda_inc = _cuda_include()
    torch_incs = [Path(p) for p in cpp_ext.include_paths()]
    if cuda_inc is None or shutil.which("g++") is None:
        pytest.skip("needs g++ and the CUDA runtime headers")
    if not any((p / "c10" / "cuda" / "CUDAStream.h").exists() for p in torch_incs):
        pytest.skip("this torch ships no c10/cuda headers")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [
        "g++",
        "-std=c++17",
        "-fsyntax-only",
        "-DSEQKERN_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-I{tmp_path}",
    ]
    cmd += [f"-I{p}" for p in torch_incs]
    cmd += [
        f"-I{cuda_inc}",
        f"-I{ROOT / 'csrc' / 'include'}",
        f"-I{ROOT / 'csrc'}",
        f"-I{sysconfig.get_paths()['include']}",
        str(api),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 0, "\n".join(errors[:30]) or proc.stderr[-3000:]
