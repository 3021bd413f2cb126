"""What a job did: one :class:`DocResult` per document, summed into a :class:`Summary`
(printed at the end, written as JSON with ``--report``)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class DocResult:
    """The outcome of one document (all its windows).

    ``status``: ``"done"`` (prefilled and stored), ``"stored"`` (every chunk was
    already in the store: nothing prefilled), ``"skipped"`` (bad input: empty,
    undecodable, a bad row) or ``"failed"`` (an error while prefilling or storing).
    """

    id: str
    status: str
    tokens: int = 0
    windows: int = 0
    tokens_prefilled: int = 0
    chunks_new: int = 0
    chunks_skipped: int = 0
    bytes_new: int = 0
    fp16_bytes_new: int = 0  # what the new entries' elements take as fp16
    reason: str = ""
    prefill_s: float = 0.0
    codec_s: float = 0.0


@dataclass
class Summary:
    """Totals over a job. ``codec_share`` is the time spent encoding and writing
    entries (on the encoder thread, overlapped with the next prefill) over the job's
    wall time; ``ratio_vs_fp16`` compares the new entries' bytes with the same elements
    in fp16. ``metrics``: the job's stores' :meth:`StoreMetrics.snapshot` summed
    (:func:`kvcodec.store.metrics.merge`; the ``kvcodec_*`` names), for the in-process
    runner; None on Ray, whose stores live in the actors."""

    documents: int = 0
    done: int = 0
    already_stored: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    tokens_prefilled: int = 0
    chunks_new: int = 0
    chunks_skipped: int = 0
    bytes_new: int = 0
    fp16_bytes_new: int = 0
    seconds: float = 0.0
    prefill_s: float = 0.0
    codec_s: float = 0.0
    problems: list = field(default_factory=list)  # [{"id", "status", "reason"}]
    metrics: dict | None = None

    def add(self, r: DocResult) -> None:
        self.documents += 1
        counter = {"done": "done", "stored": "already_stored", "skipped": "skipped",
                   "failed": "failed"}[r.status]
        setattr(self, counter, getattr(self, counter) + 1)
        for name in ("tokens", "tokens_prefilled", "chunks_new", "chunks_skipped",
                     "bytes_new", "fp16_bytes_new", "prefill_s", "codec_s"):
            setattr(self, name, getattr(self, name) + getattr(r, name))
        if r.status in ("skipped", "failed"):
            self.problems.append({"id": r.id, "status": r.status, "reason": r.reason})

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_prefilled / self.seconds if self.seconds else 0.0

    @property
    def ratio_vs_fp16(self) -> float | None:
        return self.fp16_bytes_new / self.bytes_new if self.bytes_new else None

    @property
    def codec_share(self) -> float | None:
        return self.codec_s / self.seconds if self.seconds else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(tokens_per_s=self.tokens_per_s, ratio_vs_fp16=self.ratio_vs_fp16,
                   codec_share=self.codec_share)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def lines(self) -> list:
        """The human summary, a few lines."""
        ratio = f"{self.ratio_vs_fp16:.1f}x smaller than fp16" if self.ratio_vs_fp16 else "-"
        share = f"{100 * self.codec_share:.0f}%" if self.codec_share is not None else "-"
        out = [
            f"documents: {self.documents} ({self.done} prefilled, {self.already_stored} "
            f"already stored, {self.skipped} skipped, {self.failed} failed)",
            f"tokens: {self.tokens} ({self.tokens_prefilled} prefilled, "
            f"{self.tokens_per_s:.0f} tokens/s over {self.seconds:.1f} s)",
            f"chunks: {self.chunks_new} new, {self.chunks_skipped} already stored; "
            f"{_size(self.bytes_new)} written ({ratio}); codec {share} of the time",
        ]
        for p in self.problems[:10]:
            out.append(f"  {p['status']}: {p['id']}: {p['reason']}")
        if len(self.problems) > 10:
            out.append(f"  ... and {len(self.problems) - 10} more (see --report)")
        return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
