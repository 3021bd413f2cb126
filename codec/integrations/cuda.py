"""The CUDA coder: decode .kvc streams on the GPU straight into cache tensors.

Same bitstream as the CPU coder (``csrc/common/rans.h``). For per-token-step ``uniform``
streams (the shipped default, centered or not) decoding is fused with dequantization and
RoPE re-application and writes fp16, bf16 or fp32 into a ``[1, kv_heads, tokens,
head_dim]`` tensor (HF) or a paged cache ``[num_blocks, block_size, kv_heads, head_dim]``
through a slot mapping (vLLM); other quantizers decode symbols on the GPU and dequantize
in PyTorch. Everything runs on the current CUDA stream; a kernel never raises, it
reports a status per blob, checked after the launch.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BackendError, CorruptError, ShapeError
from . import cuda_stage

STATUS = {1: "blob shorter than its lane states or odd word bytes",
          2: "invalid initial lane state", 3: "truncated word stream",
          4: "corrupt blob (final lane state mismatch)",
          5: "corrupt blob (unread words at the end)",
          6: "a symbol outside the quantizer's range; the header does not match the data",
          7: "a symbol has zero frequency in its table", 8: "output capacity too small",
          9: "unsupported geometry"}


def module():
    """The compiled CUDA module, or a BackendError saying why it is missing."""
    try:
        from .. import _cuda
    except ImportError as exc:
        raise BackendError(f"this kvcodec build has no CUDA coder ({exc}); rebuild with nvcc "
                           "on PATH (pip install -e .)") from None
    return _cuda


def compiled() -> bool:
    try:
        module()
    except BackendError:
        return False
    return True


def available() -> bool:
    """True when the CUDA coder is compiled and a GPU is visible to torch."""
    return compiled() and torch.cuda.is_available()


def _require(device) -> torch.device:
    if not available():
        raise BackendError("no CUDA device: the GPU coder needs a CUDA build of torch and a "
                           "visible GPU (use the CPU decoder instead)")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" is the current device: cuda:N,
        dev = torch.device("cuda", torch.cuda.current_device())  # as tensors report it
    return dev


def _stream() -> int:
    return int(torch.cuda.current_stream().cuda_stream)


def _check(status: torch.Tensor, names: list) -> None:
    if bad := torch.nonzero(status).flatten().tolist():  # the one sync, after all launches
        raise CorruptError(f"{names[bad[0]]}: {STATUS.get(int(status[bad[0]]), 'error')}")


_SHARED: OrderedDict = OrderedDict()  # (device, digest) -> a store's shared tables there
SHARED_KEPT = 16  # shared table sets kept on the devices, least recently used dropped


def _device_tables(f, device) -> dict:
    """Per stream ``(freqs, symbol table, range table)`` on ``device``: once per store's
    shared tables (their entries' streams then decode together in :func:`prepare_many`)."""
    key = (str(device), f.meta.shared_tables)
    if key[1] is not None and key in _SHARED:
        _SHARED.move_to_end(key)
        return _SHARED[key]
    out, nat = {}, module()
    for stream, freqs in f.sections.frequencies().items():
        fr = torch.from_numpy(np.ascontiguousarray(freqs)).to(device)
        sym = torch.empty((fr.shape[0], 4096), dtype=torch.uint8, device=device)
        rng = torch.empty((fr.shape[0], 256), dtype=torch.int32, device=device)
        nat.build_tables(fr.data_ptr(), *fr.shape, sym.data_ptr(), rng.data_ptr(), _stream())
        out[stream] = (fr, sym, rng)
    if key[1] is not None:
        _SHARED[key] = out
        while len(_SHARED) > SHARED_KEPT:
            _SHARED.popitem(last=False)
    return out


_GRIDS: dict = {}  # device -> the step grid there


def _grid(device) -> torch.Tensor:
    """``STEP_GRID`` on ``device``, uploaded once per process."""
    from ..core.quant import STEP_GRID

    key = str(device)
    if key not in _GRIDS:
        _GRIDS[key] = torch.from_numpy(STEP_GRID).to(device)
    return _GRIDS[key]


class DeviceFile:
    """A .kvc file's tables on a GPU, ready to decode chunk ranges many times."""

    def __init__(self, f, device="cuda"):
        m = f.meta
        if m.evicted:
            raise BackendError(f"{m.name} holds an evicted cache (each head keeps its own "
                               "tokens); the GPU decoder decodes dense layouts only: decode "
                               "it on the CPU with kvcodec.open(path).decode()")
        if min(m.layer_tokens) < m.num_tokens or any(
                r is not None and r.rotary_dim != m.head_dim for r in m.ropes):
            raise BackendError(f"{m.name}: sliding-window layer spans and partial rotary "
                               "dims are not decoded on the GPU yet; decode on the CPU")
        self.f = f
        self.device = _require(device)
        f.sections.index()
        self.tables = _device_tables(f, self.device)

    def decode(self, chunks=None, *, dtype=torch.float16, out=None, slots=None,
               block_size: int = 0, kernel: str = "auto"):
        """Decode every layer over ``chunks`` on the GPU: :meth:`prepare`, then the run's
        ``launch()`` and ``finish()``. Arguments and result as :meth:`prepare`'s."""
        run = self.prepare(chunks, dtype=dtype, out=out, slots=slots, block_size=block_size,
                           kernel=kernel)
        run.launch()
        return run.finish()

    def prepare(self, chunks=None, *, dtype=torch.float16, out=None, slots=None,
                block_size: int = 0, kernel: str = "auto") -> "DecodeRun":
        """Stage a decode of every layer over ``chunks``: payload uploaded, work items in
        device memory. The returned :class:`DecodeRun` launches it any number of times.

        ``out``: destinations per layer, ``[1, kv_heads, tokens, head_dim]`` (any
        strides; allocated contiguous when omitted), or with ``slots`` (int64 ``[tokens]``
        on the device) paged caches ``[num_blocks, block_size, kv_heads, head_dim]``.
        ``kernel``: ``auto`` keeps each stream's tables in shared memory (one block per
        stream's chunks) where the channel count allows (every dense config but fp32
        lossless), ``global`` reads them from global memory; same bytes either way.
        The run's ``launch()`` runs the kernel on the current stream (no allocation, sync
        or host work: capturable in a CUDA graph; it writes the sink rows too);
        ``finish()`` writes the streams the kernel does not dequantize, checks every
        blob's status (one sync; CorruptError names the first bad chunk) and returns
        ``out``.
        """
        run = prepare_many([Part(self, chunks, out, slots, block_size)], dtype=dtype, kernel=kernel)
        run.finish = lambda finish=run.finish: finish()[0]
        return run

    def finish_unfused(self, out, symbols, sides, params, t0, n, dtype, slots, block_size):
        """The streams the kernel does not dequantize (``symbols``: theirs on the device):
        PyTorch, the CPU decoder's formulas, sink rows included."""
        from ..core.streams import KINDS, unflatten
        from ..core.transforms import rope
        from ..format.plan import dequantize_stored, fp16_safe

        f, dev, sec = self.f.meta, self.device, self.f.sections
        h, d = f.num_kv_heads, f.head_dim
        n_sink = max(0, min(f.sink_tokens - t0, n))
        for (l, k), sym in symbols.items():
            q = f.quant[(l, k)]
            x = dequantize_stored(q, sym.cpu(), params[(l, k)], sides[(l, k)],
                                  f"{f.name}: layer {l} {k}s")
            if n_sink:
                x[:n_sink] = sec.sinks()[f.streams.index((l, k)), t0:t0 + n_sink]
            t = unflatten(x, h, d)
            if k == "key" and f.ropes[l] is not None:
                t = rope(t, f.ropes[l], f.position_offset + t0)
            t = fp16_safe(t, dtype).to(dtype).to(dev)
            dst = out[l][KINDS.index(k)]
            if slots is None:
                dst[:, :, :n] = t
            else:
                dst[slots // block_size, slots % block_size] = t[0].permute(1, 0, 2)


class DecodeRun:
    """A staged GPU decode (:meth:`DeviceFile.prepare`, :func:`prepare_many`): ``launch()``
    then ``finish()``. It holds every device buffer the kernel uses, so they live as long."""

    def __init__(self, launch, finish, keep):
        self.launch, self.finish, self._keep = launch, finish, keep


@dataclass
class Part:
    """One file's share of a :func:`prepare_many` decode, as :meth:`DeviceFile.prepare`."""

    file: DeviceFile
    chunks: object = None
    out: list | None = None
    slots: torch.Tensor | None = None
    block_size: int = 0


def prepare_many(parts, *, dtype=torch.float16, kernel: str = "auto") -> DecodeRun:
    """Stage several files (store entries, a step's requests; each :class:`Part` as
    :meth:`DeviceFile.prepare` takes it, one ``dtype`` and ``kernel``) as one payload
    upload and one launch, which fills more of the GPU than each file's own.
    ``finish()`` completes every part and returns their ``out`` in order (CorruptError
    for the first damaged blob); ``finish(errors=True)`` returns ``(outs, errors)``,
    ``errors[i]`` part ``i``'s CorruptError or None: keep the others, recompute it."""
    parts = list(parts)
    if not parts:
        raise ShapeError("prepare_many needs at least one part")
    if dtype not in cuda_stage.DTYPES:
        raise ShapeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if kernel not in ("auto", "global"):
        raise ShapeError(f"kernel must be 'auto' or 'global', got {kernel!r:.40}")
    if len({p.file.device for p in parts}) != 1:
        raise ShapeError("one launch runs on one device; the parts' files are on several")
    dev, nat = parts[0].file.device, module()
    dt = cuda_stage.item_dtype(tuple(nat.DECODE_ITEM_FIELDS.items()), nat.DECODE_ITEM_BYTES)
    ar, grid = cuda_stage.Arenas(), _grid(dev)
    staged = [cuda_stage.stage(p.file, p, dtype, ar, grid, dt) for p in parts]
    ar.upload(dev)  # the one copy of payload and parameters to the device
    # Copied into one array of the records' own dtype (np.concatenate would promote it
    # to a packed one, without the struct's padding, on NumPy >= 1.23).
    records, at = np.empty(sum(len(s.records) for s in staged), dtype=dt), 0
    for s in staged:
        records[at:at + len(s.records)] = s.records
        at += len(s.records)
    ar.rebase(records)
    owner = np.repeat(np.arange(len(staged)), [len(s.records) for s in staged])
    local = np.concatenate([np.arange(len(s.records)) for s in staged])
    # Items of one table set side by side: entries with shared tables share a block's copy.
    order = np.argsort(records["range_table"], kind="stable")
    records, owner, local = records[order], owner[order].tolist(), local[order].tolist()
    status = torch.zeros(len(records), dtype=torch.int32, device=dev)
    buf = torch.empty(nat.decode_buffer_bytes(len(records)), dtype=torch.uint8, device=dev)
    plan = nat.stage_decode(records, buf.data_ptr(), buf.numel(), _stream())
    shared = kernel == "auto"

    def launch():
        nat.launch_decode(buf.data_ptr(), *plan, status.data_ptr(), _stream(), shared)

    def finish(errors: bool = False):
        bad = torch.nonzero(status).flatten().tolist()  # the one sync, after all launches
        failed = [None] * len(staged)
        for i in bad:
            if failed[owner[i]] is None:
                failed[owner[i]] = CorruptError(f"{staged[owner[i]].name(local[i])}: "
                                                f"{STATUS.get(int(status[i]), 'error')}")
        outs = [None if failed[i] else s.finish() for i, s in enumerate(staged)]
        if errors:
            return outs, failed
        first = next((e for e in failed if e is not None), None)
        if first is not None:
            raise first
        return outs

    return DecodeRun(launch, finish, [ar.device, buf, status] + [s.keep for s in staged])


def encode_symbols(symbols, freqs, chunk_tokens: int, device="cuda") -> list:
    """GPU-encode one stream's symbols ``uint8 [T, C]`` with tables ``uint16 [C, A]``
    into blobs of ``chunk_tokens`` rows: the same bytes as the CPU ``encode``."""
    dev = _require(device)
    nat = module()
    sym = torch.as_tensor(np.ascontiguousarray(symbols)).to(dev)
    fr = torch.from_numpy(np.ascontiguousarray(freqs)).to(dev)
    t, c = sym.shape
    rng = torch.empty((c, 256), dtype=torch.int32, device=dev)
    nat.build_range(fr.data_ptr(), c, fr.shape[1], rng.data_ptr(), _stream())
    chunks = [(r0, min(chunk_tokens, t - r0)) for r0 in range(0, t, chunk_tokens)]
    cap = [64 + 2 * rows * c + 32 for _, rows in chunks]
    out = torch.empty(sum(cap), dtype=torch.uint8, device=dev)
    scratch = torch.empty(sum(rows * c + 16 for _, rows in chunks), dtype=torch.int16, device=dev)
    items, o, so = [], 0, 0
    for (r0, rows), cp in zip(chunks, cap):
        items.append({"symbols": sym.data_ptr() + r0 * c, "rows": rows, "channels": c,
                      "range_table": rng.data_ptr(), "scratch": scratch.data_ptr() + 2 * so,
                      "out": out.data_ptr() + o, "capacity": cp})
        o += cp
        so += rows * c + 16
    sizes = torch.zeros(len(items), dtype=torch.int64, device=dev)
    status = torch.zeros(len(items), dtype=torch.int32, device=dev)
    buf = torch.empty(len(items) * nat.ENCODE_ITEM_BYTES, dtype=torch.uint8, device=dev)
    nat.encode(items, buf.data_ptr(), buf.numel(), sizes.data_ptr(), status.data_ptr(), _stream())
    _check(status, [f"chunk {i}" for i in range(len(items))])
    host, sizes = out.cpu().numpy(), sizes.cpu().tolist()
    starts = np.cumsum([0] + cap[:-1])
    return [host[s:s + n].tobytes() for s, n in zip(starts, sizes)]
