"""Front door of corpus jobs: :func:`precompute` reads a corpus and fills a store, in
this process or on Ray, with a progress bar and a :class:`Summary` at the end."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..core.checks import is_int
from ..core.tables import threads as native_threads
from ..errors import ConfigError
from ..store.backends import open_backend
from ..store.metrics import merge
from .corpus import Corpus
from .plan import JobSpec
from .report import Summary

RUNNERS = ("local", "ray")


def precompute(inputs, store, *, model=None, spec: JobSpec | None = None,
               runner: str = "local", num_workers: int | None = None,
               address: str | None = None, text_field: str = "text",
               id_field: str | None = None, storage_options: dict | None = None,
               progress: bool = True, threads: int = 1) -> Summary:
    """Prefill every document of ``inputs`` once and store its entries in ``store``.

    Parameters
    ----------
    inputs : list of str
        Files, directories, globs or fsspec URLs: text files, JSONL or Parquet with a
        ``text_field`` column and an optional ``id_field`` (:class:`Corpus`).
    store : str or path
        A directory or an fsspec URL (``s3://bucket/kv``).
    model : str, LoadedModel or None
        A local model directory (or, for the local runner, a model already loaded with
        :func:`kvcodec.load_model`); None: the embedded SmolLM2-135M-Instruct.
    spec : JobSpec
        What to store (configs, prefix / independent / evicted, window and batch sizes).
    runner : ``"local"`` or ``"ray"``
        In this process, or on a Ray actor pool of ``num_workers`` workers (each loads
        the model once), on ``address`` (an existing cluster) or a local Ray.
    progress : bool
        A progress bar on stderr (documents, tokens/s, ETA).
    threads : int
        Coder threads per entry in the local runner (the encoder runs beside the prefill).

    Documents already finished are skipped without a prefill, so running the same
    command again after an interruption finishes the job. Returns the :class:`Summary`
    (with the stores' metrics in the local runner: ``summary.metrics``).
    """
    spec = spec or JobSpec()
    if runner not in RUNNERS:
        raise ConfigError(f"unknown runner {runner!r}; choose {' or '.join(RUNNERS)}")
    if runner == "local" and (num_workers is not None or address is not None):
        raise ConfigError("--num-workers and --address go with --runner ray")
    if num_workers is not None and not is_int(num_workers, 1):
        raise ConfigError(f"num_workers must be a positive integer, got {num_workers!r:.40}")
    native_threads(threads)  # a bad count fails now, not as every document's failure
    corpus = Corpus(inputs, text_field=text_field, id_field=id_field,
                    storage_options=storage_options)
    _check_model(model, runner)  # before the store is made (its directory was left)
    # A bad store URL fails before the model loads; temp files of writers killed
    # mid-write are swept once here, not by every Ray worker.
    open_backend(store, storage_options).sweep()
    summary = Summary()
    total = corpus.count()
    bars = []  # made at the first result: the bar's clock starts with the work

    def emit(result):
        summary.add(result)
        if progress and not bars:
            bars.append(_bar(total))
        if bars:
            bar = bars[0]
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{summary.tokens_prefilled / max(elapsed, 1e-9):.0f} tok/s, "
                                f"{summary.chunks_new} new chunks", refresh=False)
            bar.update(1)

    try:
        if runner == "local":
            from ..models.loading import LoadedModel, load_model
            from .engine import Engine

            lm = model if isinstance(model, LoadedModel) else load_model(model)
            if "klt" in spec.configs:
                _fit_klt(lm, corpus, store, storage_options)
            engine = Engine(lm, spec, store, storage_options=storage_options, threads=threads)
            start = time.perf_counter()
            engine.run(iter(corpus), emit)
            summary.metrics = merge(s.metrics.snapshot() for s in engine.stores)
        else:
            from ..models.loading import LoadedModel
            from .ray_runner import run_ray

            if isinstance(model, LoadedModel):
                raise ConfigError("Ray workers load the model themselves: pass its directory "
                                  "(or None for the embedded model), not a loaded model")
            if "klt" in spec.configs:  # the workers' stores need a fit that exists
                _check_klt(model, store, storage_options)

            start = time.perf_counter()
            run_ray(corpus, store, spec, emit, model=model, num_workers=num_workers or 2,
                    address=address, storage_options=storage_options)
    finally:
        for bar in bars:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _check_model(model, runner: str) -> None:
    """The model's config, checked as one kvcodec codes (no weights): here where this
    process loads it, or where Ray's workers will and its directory is here too."""
    from ..models.loading import LoadedModel, model_config, resolve_model_path

    if isinstance(model, LoadedModel):
        return
    if runner == "local" or (isinstance(model, str) and Path(model).is_dir()):
        model_config(resolve_model_path(model))


def _bar(total):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="precompute", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _fit_klt(lm, corpus, store, storage_options, tries: int = 8) -> None:
    """``"klt"`` for a model that has no ``klt`` anywhere (no calibration, no fit kept on
    this machine or in ``store``): fitted on the cache of the first of the job's first
    ``tries`` documents long enough for it (:func:`kvcodec.core.fit.first_fit`), kept on
    this machine, and so put into the store by the job's stores. Nothing to fit on
    leaves the stores to say what is missing."""
    from ..core.config import load_config
    from ..core.fit import first_fit, save_fitted
    from ..models import capture_kv
    from ..store import ChunkStore
    from .corpus import Document

    try:
        ChunkStore(store, lm.fingerprint, "klt", storage_options=storage_options)
        return  # a calibration or a kept fit
    except ConfigError:
        pass
    base = load_config("default", model=lm.fingerprint)
    docs = (d for d in corpus if isinstance(d, Document))
    for _, doc in zip(range(tries), docs):
        got = first_fit(capture_kv(lm, doc.text, max_tokens=2048), base)
        if got is not None:
            try:
                save_fitted(*got)
            except OSError as exc:
                raise ConfigError(f"cannot keep the klt fitted on {doc.id!r}: {exc}") from None
            return


def _check_klt(model, store, storage_options) -> None:
    """Before a Ray job of ``"klt"``: a ConfigError now, not in every worker, where the
    model has no ``klt`` anywhere (the local runner fits one; Ray workers do not)."""
    from ..models.fingerprint import fingerprint_dir
    from ..models.loading import resolve_model_path
    from ..store import ChunkStore

    fp = fingerprint_dir(resolve_model_path(model))
    try:
        ChunkStore(store, fp, "klt", storage_options=storage_options)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; on Ray, fit it first: kvcodec encode --config klt on one "
                          "document, or this job with --runner local") from None
