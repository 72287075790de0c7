"""Fetch the upstream code that the compat tests compare seqkern against (test time only).

    python tests/upstream/fetch.py

- ESPnet 202506 (the only release with all four target paths), installed with --no-deps: its
  full dependency set is heavy and pins other torch versions. The few pure-Python packages the
  target modules import are installed beside it.
- torchaudio 2.8.0 (the last release with ConvEmformer): only the pure-Python files of its
  wheel, unpacked into .upstream/ (or $SEQKERN_UPSTREAM_DIR). Its compiled library is built for
  torch 2.8 and is never loaded; tests/reference/conftest.py loads the few files it needs.

Every target file is checked against the sha256 recorded in ../shared/spec/upstream.md, so the
tests compare against exactly the code the spec describes. seqkern itself never imports either.
"""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from seqkern.bench.upstream import torchaudio_dir

ESPNET = "espnet==202506"
ESPNET_IMPORTS = ["typeguard", "packaging", "numpy"]
TORCHAUDIO = "torchaudio==2.8.0"

# First 12 hex digits of sha256, as recorded in the spec's provenance table.
ESPNET_SHA = {
    "espnet2/speechlm/module/valle.py": "a07217ed0fed",
    "espnet2/speechlm/module/transformer.py": "a8224899aa61",
    "espnet2/asr_transducer/decoder/mega_decoder.py": "bbc6ae2e122c",
    "espnet2/asr_transducer/decoder/blocks/mega.py": "204d53839f1b",
    "espnet2/asr_transducer/decoder/modules/mega/multi_head_damped_ema.py": "abf629be1532",
    "espnet2/asr_transducer/decoder/modules/mega/positional_bias.py": "8c3dd4b3d0a3",
    "espnet2/asr_transducer/decoder/modules/mega/feed_forward.py": "53132771e71d",
    "espnet2/asr/encoder/beats_encoder.py": "c483a8d02923",
    "espnet2/asr/state_spaces/base.py": "4fb14657ddb8",
}
TORCHAUDIO_SHA = {
    "torchaudio/models/emformer.py": "9dc0de11c61e",
    "torchaudio/prototype/models/conv_emformer.py": "e2eccd5bf744",
}


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _pip(*args: str) -> None:
    """pip, with its dependency-resolver report on ESPnet's own (deliberately not installed)
    requirements folded into one line: that is the expected state of a --no-deps install."""
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    kept, folded = [], 0
    for line in proc.stderr.splitlines(keepends=True):
        resolver = line.startswith("ERROR: pip's dependency resolver") or line.startswith(
            "espnet 202506 requires"
        )
        if resolver and proc.returncode == 0:
            folded += 1
        else:
            kept.append(line)
    sys.stderr.write("".join(kept))
    if folded:
        print(
            f"(pip's resolver listed ESPnet's {folded - 1} undeclared requirements: expected, "
            "ESPnet is installed with --no-deps and only what the target modules import is "
            "added)"
        )
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


def fetch_espnet() -> None:
    if importlib.util.find_spec("espnet2") is None:
        _pip("install", "--no-deps", ESPNET)
    _pip("install", "-q", *ESPNET_IMPORTS)
    base = Path(importlib.util.find_spec("espnet2").submodule_search_locations[0]).parent
    for rel, want in ESPNET_SHA.items():
        got = sha12(base / rel)
        if got != want:
            raise SystemExit(f"{rel}: sha256 {got}... but the spec read {want}...; wrong espnet?")


def fetch_torchaudio() -> None:
    dest = torchaudio_dir()
    if not all((dest / rel).exists() for rel in TORCHAUDIO_SHA):
        with tempfile.TemporaryDirectory() as tmp:
            # The .py files are the same in every platform's wheel; pin one so any host works.
            _pip(
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--platform",
                "manylinux_2_28_x86_64",
                TORCHAUDIO,
                "-d",
                tmp,
            )
            (wheel,) = Path(tmp).glob("torchaudio-*.whl")
            with zipfile.ZipFile(wheel) as zf:
                for name in zf.namelist():
                    if name.startswith("torchaudio/") and name.endswith(".py"):
                        zf.extract(name, dest)
    for rel, want in TORCHAUDIO_SHA.items():
        got = sha12(dest / rel)
        if got != want:
            raise SystemExit(f"{rel}: sha256 {got}... but the spec read {want}...")


def main() -> int:
    fetch_espnet()
    fetch_torchaudio()
    print(
        f"upstream ready: espnet 202506 installed, torchaudio 2.8.0 sources in {torchaudio_dir()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
