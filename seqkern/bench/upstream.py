"""The upstream modules a benchmark compares against, found without making them dependencies.

seqkern never imports ESPnet or torchaudio at run time; the benchmarks (and the tests) use them
when they are there:

* torchaudio's Emformer / ConvEmformer: an importable torchaudio that still has them, else the
  pure-Python torchaudio 2.8.0 sources that `python tests/upstream/fetch.py` unpacks into
  `.upstream/` (or `$SEQKERN_UPSTREAM_DIR`), loaded without torchaudio's compiled library
  (built for another torch);
* ESPnet's MEGADecoder and BeatsEncoder: an importable espnet2 (fetch.py installs ESPnet 202506).

Each finder returns None when its module cannot be had; the caller says so.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def upstream_dir() -> Path:
    """$SEQKERN_UPSTREAM_DIR, else `.upstream/` of the checkout seqkern runs from (an editable
    install), else `.upstream/` of the working directory (an installed seqkern, run from a
    clone)."""
    if "SEQKERN_UPSTREAM_DIR" in os.environ:
        return Path(os.environ["SEQKERN_UPSTREAM_DIR"])
    if (ROOT / "pyproject.toml").exists():
        return ROOT / ".upstream"
    return Path.cwd() / ".upstream"


def torchaudio_dir() -> Path:
    return upstream_dir() / "torchaudio-2.8.0"


def load_torchaudio_sources(source_dir: Path | None = None) -> None:
    """Make torchaudio's pure-Python files importable without running torchaudio/__init__.py.

    The package objects are stand-ins whose __path__ points at the unpacked sources, so the
    compiled library (built for torch 2.8) is never loaded.
    """
    if "torchaudio.prototype.models._emformer_hubert" in sys.modules:
        return
    pkg_root = (source_dir or torchaudio_dir()) / "torchaudio"
    for name in (
        "torchaudio",
        "torchaudio._internal",
        "torchaudio.compliance",
        "torchaudio.models",
        "torchaudio.prototype",
        "torchaudio.prototype.models",
    ):
        module = types.ModuleType(name)
        module.__path__ = [str(pkg_root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = module
    for name in (
        "torchaudio._internal.module_utils",
        "torchaudio.compliance.kaldi",
        "torchaudio.models.emformer",
        "torchaudio.prototype.models.conv_emformer",
        "torchaudio.models.rnnt",  # imports Emformer from the package: set just before
        "torchaudio.models.rnnt_decoder",  # imports RNNT from the package
        "torchaudio.models.wav2vec2",  # a package (pure Python)
        "torchaudio.prototype.models._emformer_hubert",  # imports Wav2Vec2Model
    ):
        models = sys.modules["torchaudio.models"]
        if name == "torchaudio.models.rnnt":
            models.Emformer = sys.modules["torchaudio.models.emformer"].Emformer
        if name == "torchaudio.models.rnnt_decoder":
            models.RNNT = sys.modules["torchaudio.models.rnnt"].RNNT
        if name == "torchaudio.prototype.models._emformer_hubert":
            models.Wav2Vec2Model = sys.modules["torchaudio.models.wav2vec2"].Wav2Vec2Model
        path = pkg_root.joinpath(*name.split(".")[1:])
        package = path.is_dir()
        path = path / "__init__.py" if package else path.with_suffix(".py")
        spec = importlib.util.spec_from_file_location(
            name, path, submodule_search_locations=[str(path.parent)] if package else None
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, module)


def torchaudio_emformers() -> tuple[type, type, str] | None:
    """(Emformer, ConvEmformer, where they came from), or None."""
    if "torchaudio" not in sys.modules:  # a real install first (one that still has both)
        try:
            import torchaudio
            from torchaudio.models import Emformer
            from torchaudio.prototype.models import ConvEmformer

            return Emformer, ConvEmformer, f"torchaudio {torchaudio.__version__}"
        except Exception:  # noqa: BLE001 - absent, or built for another torch
            for name in [m for m in sys.modules if m.split(".")[0] == "torchaudio"]:
                del sys.modules[name]
    if not (torchaudio_dir() / "torchaudio" / "models" / "emformer.py").exists():
        if "torchaudio.models.emformer" not in sys.modules:
            return None
    load_torchaudio_sources()
    return (
        sys.modules["torchaudio.models.emformer"].Emformer,
        sys.modules["torchaudio.prototype.models.conv_emformer"].ConvEmformer,
        "torchaudio 2.8.0 (sources)",
    )


def espnet_class(module: str, name: str) -> tuple[type, str] | None:
    """(ESPnet's `module.name`, "espnet <version>"), or None when ESPnet cannot import it.
    ESPnet modules that import torchaudio get the sources torchaudio_emformers() finds."""
    torchaudio_emformers()
    try:
        cls = getattr(importlib.import_module(module), name)
        from importlib.metadata import version

        return cls, f"espnet {version('espnet')}"
    except Exception:  # noqa: BLE001 - not installed, or missing one of its own dependencies
        return None
