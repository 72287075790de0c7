"""Packaging: where things install, and that `import seqkern` survives missing pieces."""

import ast
import json
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str, tmp_path: Path, blocked: set[str] = frozenset()) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where the modules in `blocked` fail to import."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    prefix = f"BLOCKED = {set(blocked)!r}\n" + BLOCKER if blocked else ""
    # cwd outside the repo: nothing may be importable just because it sits in the work tree.
    return subprocess.run(
        [sys.executable, "-c", prefix + textwrap.dedent(code)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


BLOCKER = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in BLOCKED or name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, _Block())
"""


def test_triton_kernels_installs_as_seqkern_triton_and_shadows_nothing(tmp_path):
    proc = _run(
        """
        import importlib.util, json, seqkern
        spec = importlib.util.find_spec("seqkern._triton")
        top = importlib.util.find_spec("triton_kernels")
        print(json.dumps({"ours": spec.origin,
                          "top": top.origin if top else None,
                          "top_dirs": list(top.submodule_search_locations or []) if top else []}))
        """,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(found["ours"]).parent.name == "triton_kernels"
    ours = str(Path(found["ours"]).parent.resolve())
    # A top-level `triton_kernels` may exist (Triton's companion package), but never ours.
    assert found["top"] is None or all(str(Path(d).resolve()) != ours for d in found["top_dirs"])


def test_setup_lists_every_package():
    """A non-editable install ships only the packages setup.py names (an editable one sees the
    work tree): every folder of seqkern/ with an __init__.py must be there."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    )
    listed = set(ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages")))
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "seqkern").rglob("__init__.py")
    }
    assert found | {"seqkern._triton"} == listed


def test_import_without_C_reports_instead_of_raising(tmp_path):
    proc = _run(
        """
        import torch, seqkern
        from seqkern import backends
        assert backends.unavailable_reason("cpu") is not None
        assert backends.unavailable_reason("cuda") is not None
        x = torch.randn(2, 3, 8); g = torch.randn(2, 8); b = torch.randn(2, 8)
        y = seqkern.adaln(x, g, b)          # falls back to the reference
        assert torch.allclose(y, seqkern.adaln_ref(x, g, b), atol=1e-5)
        try:
            with seqkern.use_backend("cpu"):
                seqkern.adaln(x, g, b)
        except seqkern.BackendError as e:
            print("ERR", e)
        print(seqkern.info())
        """,
        tmp_path,
        blocked={"seqkern._C"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "ERR seqkern.adaln" in proc.stdout and "blocked for this test" in proc.stdout
    assert "adaln" in proc.stdout


def test_import_without_triton_reports_instead_of_raising(tmp_path):
    proc = _run(
        """
        import torch, seqkern
        from seqkern import backends
        why = backends.unavailable_reason("triton")
        assert why and "triton is not importable" in why, why
        x = torch.randn(2, 3, 8); g = torch.randn(2, 8); b = torch.randn(2, 8)
        seqkern.adaln(x, g, b)
        print(seqkern.info())
        """,
        tmp_path,
        blocked={"triton"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "triton is not importable" in proc.stdout


def test_reference_imports_nothing_accelerated():
    # Data flows module -> op -> backend -> kernel; the oracle stands apart from all of it.
    allowed_roots = {
        "torch",
        "math",
        "typing",
        "collections",
        "dataclasses",
        "__future__",
        "functools",
        "itertools",
        "warnings",
        "numbers",
    }
    for path in sorted((ROOT / "seqkern" / "reference").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                ok = name.split(".")[0] in allowed_roots or name.startswith("seqkern.reference")
                assert ok, f"{path.name} imports {name}: the reference must stay plain PyTorch"


def test_reference_runs_with_C_and_triton_blocked(tmp_path):
    proc = _run(
        """
        import torch
        from seqkern.reference import adaln_ref
        y = adaln_ref(torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8))
        assert y.shape == (2, 3, 8)
        """,
        tmp_path,
        blocked={"seqkern._C", "triton"},
    )
    assert proc.returncode == 0, proc.stderr


def test_info_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "seqkern", "info"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("seqkern", "torch", "seqkern._C", "GPU", "adaln", "reference"):
        assert word in out, f"{word!r} missing from seqkern info:\n{out}"
    for word in (
        "CPU ISA:",
        "AVX-512F",
        "AVX512-BF16",
        "AVX512-VNNI",
        "AMX-BF16",
        "CPU code per op",
    ):
        assert word in out, f"{word!r} missing from seqkern info:\n{out}"


def _cpuinfo_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_cpu_dispatch_follows_the_isa_not_the_vendor():
    """The multiversioned loops run the clone of the CPU's ISA level (an AMD EPYC with AVX-512
    runs the x86-64-v4 clone, as an Intel Xeon does), and the skinny GEMM runs where AVX-512F
    is: what `seqkern info` prints is what the resolver picks."""
    from seqkern import _ext

    flags = _cpuinfo_flags()
    if flags is None or platform.machine() != "x86_64":
        pytest.skip("needs /proc/cpuinfo on x86-64")
    if _ext.C is None:
        pytest.fail(f"seqkern._C did not load: {_ext.C_ERROR}")
    dispatch = _ext.C.cpu_dispatch()
    v3 = {"avx2", "fma", "bmi1", "bmi2", "movbe"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    assert dispatch["multiversion_clone"] == (
        "x86-64-v4" if v4 else "x86-64-v3" if v3 else "default"
    )
    assert dispatch["skinny_gemm"] == ("avx512f" if "avx512f" in flags else "blas")


def test_every_multiversion_clone_holds_its_own_body():
    """Each x86-64-v4 clone of an SK_MULTIVERSION function is its own AVX-512 code, not a jump
    to one shared body: GCC compiles a body the clone does not inline once, for the baseline
    ISA (SK_INLINE marks the bodies). Read from the built extension's disassembly."""
    from seqkern import _ext

    objdump = shutil.which("objdump")
    if objdump is None or platform.machine() != "x86_64" or _ext.C is None:
        pytest.skip("needs objdump and the built extension on x86-64")
    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", "-C", _ext.C.__file__],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    clones = {}
    for block in text.split("\n\n"):
        head, _, body = block.partition("\n")
        if head.endswith("[clone .arch_x86_64_v4]>:"):
            clones[head] = body
    if not clones:
        pytest.skip("this build has no multiversioned functions (not GCC on Linux)")
    for head, body in clones.items():
        lines = [line for line in body.splitlines() if line.strip()]
        assert len(lines) > 8 and any("zmm" in line for line in lines), (head, lines[:4])


@pytest.mark.parametrize(
    "raw,folder",
    [
        ("Intel(R) Xeon(R) Processor", "cpu-intel-xeon"),
        ("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "cpu-intel-xeon-platinum-8480"),
        ("AMD EPYC", "cpu-amd-epyc"),
        ("AMD EPYC 9354 32-Core Processor", "cpu-amd-epyc-9354"),
    ],
)
def test_result_folder_names_read_as_the_machine(raw, folder):
    from seqkern.bench import clean_cpu_model, slug

    assert slug(f"CPU {clean_cpu_model(raw)}") == folder


@pytest.mark.slow
def test_bench_quick_writes_results(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "seqkern",
            "bench",
            "--quick",
            "--out",
            str(tmp_path / "res"),
            "--run-name",
            "ci",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list((tmp_path / "res").rglob("ci.json"))
    assert len(files) == 1, list((tmp_path / "res").rglob("*"))
    data = json.loads(files[0].read_text())
    for key in ("device", "torch", "triton", "cuda", "seqkern", "commit", "date", "rows"):
        assert key in data
    assert data["rows"], "no rows"
    row_keys = {
        "op",
        "case",
        "dtype",
        "direction",
        "provider",
        "ms",
        "tflops",
        "gbps",
        "peak_mem_mb",
        "max_err",
    }
    for row in data["rows"]:
        assert row_keys <= set(row), row
        assert row["ms"] is None or row["ms"] > 0
    providers = {r["provider"] for r in data["rows"]}
    assert {"seqkern", "upstream"} <= providers, providers
    seqkern_rows = [r for r in data["rows"] if r["provider"] == "seqkern"]
    assert all(r["max_err"] is not None and r["max_err"] < 1e-3 for r in seqkern_rows)
    assert list(files[0].parent.glob("ci-adaln.png")), "no plot"
