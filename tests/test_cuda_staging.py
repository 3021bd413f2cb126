"""The GPU decode's host staging, checked without a GPU: the work items are staged for
the CPU as the "device" (every pointer then a host address), and a Python model of the
kernel follows them (symbols from the CPU rANS decoder, then the fused dequantization,
RoPE, sink rows and destination addressing the kernel does). What it writes must equal
the CPU decoder's tensors: one file, a chunk range, a paged cache, several files in one
staging and a store's prefix. The kernel itself is tested on a GPU (test_cuda.py)."""
import ctypes
import dataclasses

import numpy as np
import pytest
import torch

import kvcodec
from kvcodec.core import tables
from kvcodec.integrations import cuda, cuda_store

nat_cuda = pytest.importorskip("kvcodec._cuda", reason="no CUDA build (nvcc missing)")


def _at(ptr: int, n: int, dtype) -> np.ndarray:
    """``n`` items of ``dtype`` at host address ``ptr`` (a view)."""
    dtype = np.dtype(dtype)
    return np.frombuffer((ctypes.c_char * (n * dtype.itemsize)).from_address(ptr), dtype=dtype)


class KernelModel:
    """What the CUDA module does with staged records, in Python on host memory."""

    DECODE_ITEM_FIELDS = nat_cuda.DECODE_ITEM_FIELDS
    DECODE_ITEM_BYTES = nat_cuda.DECODE_ITEM_BYTES

    def __init__(self):
        self.freqs, self.records = {}, None

    def build_tables(self, freqs, channels, alphabet, symbol, range_, stream):
        self.freqs[range_] = _at(freqs, channels * alphabet, np.uint16).reshape(channels, alphabet)

    def decode_buffer_bytes(self, n):
        return nat_cuda.decode_buffer_bytes(n)

    def stage_decode(self, records, buf, capacity, stream):
        assert records.dtype.itemsize == self.DECODE_ITEM_BYTES and records.flags.c_contiguous
        self.records = records.copy()
        return len(records), 1, int(records["channels"].max())

    def launch_decode(self, buf, n, n_groups, max_channels, status, stream, shared):
        st = _at(status, n, np.int32)
        for i, r in enumerate(self.records):
            rows, cols = int(r["rows"]), int(r["channels"])
            sym = np.zeros((rows, cols), np.uint8)
            blob = _at(int(r["blob"]), int(r["size"]), np.uint8).tobytes()
            if tables.native().decode_many([([blob], self.freqs[int(r["range_table"])], sym)],
                                           max(rows, 1), 1) != [None]:
                st[i] = 4
                continue
            _at(int(r["symbols"]), rows * cols, np.uint8)[:] = sym.ravel()
            if r["dst"]:
                self.dequantize(r, sym)

    @staticmethod
    def dequantize(r, sym):
        c, d = int(r["channels"]) - 1, int(r["head_dim"])
        out_dtype = {0: np.float16, 2: np.float32}[int(r["dtype"])]
        grid, mult = _at(int(r["grid"]), 256, np.float32), _at(int(r["mult"]), c, np.float32)
        add = _at(int(r["add"]), c, np.float32) if r["add"] else None
        for t in range(int(r["rows"])):
            if t < int(r["first_row"]):
                if not r["sink"]:
                    continue
                v = _at(int(r["sink"]) + 4 * t * c, c, np.float32)
            else:
                v = (sym[t, :c].astype(np.float32) - int(r["half_range"])) * (grid[sym[t, c]] * mult)
                v = v + add if add is not None else v
                if r["cos"]:
                    x = v.reshape(-1, d)
                    cos = _at(int(r["cos"]) + 4 * t * d, d, np.float32)
                    sin = _at(int(r["sin"]) + 4 * t * d, d, np.float32)
                    rot = np.concatenate([-x[:, d // 2:], x[:, :d // 2]], -1)
                    v = (x * cos + rot * sin).ravel()
            if r["slots"]:
                s = int(_at(int(r["slots"]) + 8 * t, 1, np.int64)[0])
                b = int(r["block_size"])
                where = s // b * int(r["stride_block"]) + s % b * int(r["stride_token"])
            else:
                where = t * int(r["stride_token"])
            h, i = np.divmod(np.arange(c), d)
            offs = h * int(r["stride_head"]) + i * int(r["stride_dim"]) + where
            dst = _at(int(r["dst"]), int(offs.max()) + 1, out_dtype)
            dst[offs] = v.astype(out_dtype)


@pytest.fixture
def model(monkeypatch):
    m = KernelModel()
    monkeypatch.setattr(cuda, "available", lambda: True)
    monkeypatch.setattr(cuda, "module", lambda: m)
    monkeypatch.setattr(cuda, "_stream", lambda: 0)
    monkeypatch.setattr(cuda, "_SHARED", type(cuda._SHARED)())
    return m


@pytest.fixture(scope="module")
def kv4(kv_600):
    """Four layers of the real cache (the model is slow), four sink tokens."""
    model = {**kv_600.model, "num_layers": 4,
             "rope": {**kv_600.model["rope"], "layers": kv_600.model["rope"]["layers"][:4]}}
    imp = kv_600.importance
    return dataclasses.replace(kv_600, keys=kv_600.keys[:4], values=kv_600.values[:4],
                               model=model, importance=None if imp is None else imp[:4])


def _config(name):
    from kvcodec.core.config import load_config

    if name == "sinks":
        cfg = load_config("default")
        cfg["sink_tokens"] = 4
        return cfg
    return name


@pytest.mark.parametrize("cfg", ["default", "sinks", "lossless"])
def test_staged_items_reproduce_the_cpu_decode(model, kv4, cfg):
    data = kvcodec.encode(kv4, config=_config(cfg))
    ref = kvcodec.decode(data, dtype=torch.float32)
    n, h, d, block = kv4.num_tokens, kv4.num_kv_heads, kv4.head_dim, 16
    slots = torch.randperm(64 * block)[:n].to(torch.int64)
    paged = [tuple(torch.zeros((64, block, h, d)) for _ in range(2)) for _ in range(4)]
    with kvcodec.open(data) as f:
        whole = cuda.DeviceFile(f, "cpu").decode(dtype=torch.float32)
        part = cuda.DeviceFile(f, "cpu").decode(chunks=range(1, 3), dtype=torch.float32)
        cuda.DeviceFile(f, "cpu").decode(dtype=torch.float32, out=paged, slots=slots,
                                         block_size=block)
    for l in range(4):
        for kind, want in enumerate((ref.keys[l], ref.values[l])):
            assert torch.equal(whole[l][kind], want), (cfg, l, kind)
            assert torch.equal(part[l][kind], want[:, :, 256:]), (cfg, l, kind)
            got = paged[l][kind][slots // block, slots % block].permute(1, 0, 2)[None]
            assert torch.equal(got, want), (cfg, l, kind)


def test_many_files_and_a_store_prefix_stage_as_one(model, kv4, tmp_path):
    """Two configs' files in one staging (records of both sorted by table set), and a
    store's entries (shared tables, each entry's own sink rows) into fp16 buffers."""
    datas = [kvcodec.encode(kv4, config=c) for c in ("default", "lossless")]
    files = [kvcodec.open(x) for x in datas]
    run = cuda.prepare_many([cuda.Part(cuda.DeviceFile(f, "cpu")) for f in files],
                            dtype=torch.float32)
    run.launch()
    for data, out in zip(datas, run.finish()):
        ref = kvcodec.decode(data, dtype=torch.float32)
        assert all(torch.equal(out[l][0], ref.keys[l]) and torch.equal(out[l][1], ref.values[l])
                   for l in range(4))
    for f in files:
        f.close()
    from kvcodec.store import ChunkStore

    store = ChunkStore(tmp_path, kv4.model)
    store.put(kv4)
    locs = store.lookup(kv4.token_ids, partial=True)
    ref = [tuple(torch.zeros(1, 3, 700, 64) for _ in range(2)) for _ in range(4)]
    got = [tuple(torch.zeros(1, 3, 700, 64, dtype=torch.float16) for _ in range(2))
           for _ in range(4)]
    assert store.fill(ref, kv4.token_ids, locs) == cuda_store.fill(store, got, kv4.token_ids,
                                                                   locs) == 600
    assert (model.records["sink"] != 0).sum() == len(locs) * 4 * 2  # every entry's sinks
    for l in range(4):
        for kind in (0, 1):
            assert torch.equal(got[l][kind], ref[l][kind].half()), (l, kind)
