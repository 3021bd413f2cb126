"""The Ray runner: the same :class:`~kvcodec.jobs.engine.Engine` on a pool of Ray actors.

Each actor takes one CPU (``--num-workers`` of them), loads the model once, and
receives documents in batches of ``DOCS_PER_TASK``; the driver reads the corpus, keeps
at most two batches in flight per actor, and gathers the per-document results. Actors
write entries and manifest records to the store themselves (a directory every node can
reach, or an object store), so the driver never holds KV. An actor's KV does not depend
on which documents it was given (:mod:`kvcodec.models.batch`), so the store is byte for
byte the one the in-process runner writes.

``address`` joins an existing cluster (``ray.init(address=...)``; kvcodec and the model
must be installed on its nodes); without it a local Ray starts with ``num_workers``
CPUs, or a Ray already initialised in this process is used as it is.
"""
from __future__ import annotations

from ..errors import BackendError, ConfigError
from .corpus import Skipped
from .report import DocResult

DOCS_PER_TASK = 8


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--runner ray needs Ray: pip install 'kvcodec-toolkit[ray]'") from None
    return ray


def run_ray(corpus, store, spec, emit, *, model=None, num_workers: int = 2,
            address: str | None = None, storage_options=None) -> None:
    """Process ``corpus`` on ``num_workers`` Ray actors, calling ``emit(DocResult)``
    for every document as results come back."""
    ray = _ray()
    if num_workers < 1:
        raise ConfigError(f"--num-workers must be at least 1, got {num_workers}")
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_workers, include_dashboard=False, log_to_driver=False)

    worker_cls = ray.remote(num_cpus=1)(_Worker)
    workers = [worker_cls.remote(model, spec, str(store), storage_options)
               for _ in range(num_workers)]
    try:
        ray.get([w.ready.remote() for w in workers])
        _dispatch(ray, workers, corpus, emit)
    except ray.exceptions.RayError as exc:
        raise BackendError(f"a Ray worker failed: {str(exc).splitlines()[0]}; run the same "
                           "command again to resume") from None
    finally:
        for w in workers:
            ray.kill(w)


def _dispatch(ray, workers, corpus, emit) -> None:
    idle = list(workers) * 2  # two batches in flight per actor
    running = {}

    def collect() -> None:
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            idle.append(running.pop(ref))
            for result in ray.get(ref):
                emit(result)

    def submit(docs) -> None:
        while not idle:
            collect()
        w = idle.pop(0)
        running[w.process.remote(docs)] = w

    batch = []
    for item in corpus:
        if isinstance(item, Skipped):
            emit(DocResult(item.id, "skipped", reason=item.reason))
            continue
        batch.append(item)
        if len(batch) == DOCS_PER_TASK:
            submit(batch)
            batch = []
    if batch:
        submit(batch)
    while running:
        collect()


class _Worker:
    """One Ray actor: the model loaded once, an engine over the job's stores."""

    def __init__(self, model, spec, store, storage_options):
        import torch

        from ..models.loading import load_model
        from .engine import Engine

        torch.set_num_threads(1)
        self.engine = Engine(load_model(model), spec, store,
                             storage_options=storage_options, threads=1)

    def ready(self) -> bool:
        return True

    def process(self, docs) -> list:
        out = []
        self.engine.run(docs, out.append)
        return out
