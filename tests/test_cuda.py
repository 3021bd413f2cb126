"""The CUDA coder: same bytes as the CPU coder both ways, fused decode into HF and paged
caches. Everything that needs a GPU skips cleanly without one."""
import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import kvcodec
from kvcodec.core import tables
from kvcodec.format import container
from kvcodec.integrations import cuda
from kvcodec.errors import BackendError, CorruptError

needs_gpu = pytest.mark.skipif(not cuda.available(), reason="no CUDA device")


def test_cuda_module_is_built_wherever_nvcc_exists():
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on PATH")
    nat = cuda.module()
    # The host staging copies these structs byte for byte into the kernels' arrays: the
    # decode records are built in the layout the module reports, every field inside.
    assert nat.DECODE_ITEM_BYTES == 168 and nat.ENCODE_ITEM_BYTES == 48
    fields = nat.DECODE_ITEM_FIELDS
    assert {"blob", "symbols", "dst", "sink", "first_row", "slots"} <= set(fields)
    assert all(0 <= off and off + int(fmt[1]) <= 168 for off, fmt in fields.values())


def test_missing_gpu_is_a_clear_error(default_kvc):
    if cuda.available():
        pytest.skip("a GPU is present")
    with kvcodec.open(default_kvc) as f:
        with pytest.raises(BackendError, match="CUDA|GPU"):
            cuda.DeviceFile(f)


@needs_gpu
@pytest.mark.parametrize("kernel", ["auto", "global"])
@pytest.mark.parametrize("cfg", kvcodec.available_configs())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_decode_equals_cpu_decode(kv_600, cfg, dtype, kernel):
    """Tables in shared memory (auto) or global memory: the CPU decoder's tensors."""
    data = kvcodec.encode(kv_600, config=cfg)
    ref = kvcodec.decode(data, dtype=dtype)
    with kvcodec.open(data) as f:
        out = cuda.DeviceFile(f).decode(dtype=dtype, kernel=kernel)
        part = cuda.DeviceFile(f).decode(chunks=range(1, 3), dtype=dtype, kernel=kernel)
    for l in range(30):
        assert torch.equal(out[l][0].cpu(), ref.keys[l])
        assert torch.equal(out[l][1].cpu(), ref.values[l])
        assert torch.equal(part[l][0].cpu(), ref.keys[l][:, :, 256:600])


def _variant(name: str, channels: int) -> dict:
    """The default config with one feature changed: keys not centered (the fused path
    without offsets), one step multiplier per key channel (calibrate --fast's query
    weights), or four sink tokens (a chunk range that starts inside and after them)."""
    from kvcodec.core.config import load_config

    cfg = load_config("default")
    key = cfg["key"][0]["quantizer"]
    if name == "lossless":
        return "lossless"
    if name == "uncentered":
        key["center"] = False
    elif name == "channel_steps":
        key["head_scale"] = [4.0 if c % 3 else 0.5 for c in range(channels)]
    else:
        cfg["sink_tokens"] = 4
    return cfg


@needs_gpu
@pytest.mark.parametrize("variant", ["uncentered", "channel_steps", "sinks", "lossless"])
@pytest.mark.parametrize("source", [torch.float16, torch.float32])
def test_gpu_decode_equals_cpu_decode_for_config_variants(kv_600, variant, source):
    """Variants of the default, and lossless from fp16 and fp32 caches: fp32 has four byte
    planes per channel, more columns than shared memory holds tables for (the global
    tables take over)."""
    kv = dataclasses.replace(kv_600, keys=[k.to(source) for k in kv_600.keys],
                             values=[v.to(source) for v in kv_600.values])
    cfg = _variant(variant, kv_600.num_kv_heads * kv_600.head_dim)
    data = kvcodec.encode(kv, config=cfg)
    ref = kvcodec.decode(data, dtype=torch.float32)
    with kvcodec.open(data) as f:
        out = cuda.DeviceFile(f).decode(dtype=torch.float32)
        part = cuda.DeviceFile(f).decode(chunks=range(1, 3), dtype=torch.float32)
    for l in range(30):
        for kind in (0, 1):
            want = (ref.keys, ref.values)[kind][l]
            assert torch.equal(out[l][kind].cpu(), want), (variant, l, kind)
            assert torch.equal(part[l][kind].cpu(), want[:, :, 256:600]), (variant, l, kind)


@needs_gpu
def test_gpu_decode_into_a_paged_cache(kv_600):
    data = kvcodec.encode(kv_600)
    ref = kvcodec.decode(data, dtype=torch.float16)
    block, n = 16, 600
    slots = torch.randperm(64 * block, device="cuda")[:n].to(torch.int64)
    caches = [tuple(torch.zeros((64, block, 3, 64), dtype=torch.float16, device="cuda")
                    for _ in range(2)) for _ in range(30)]
    with kvcodec.open(data) as f:
        cuda.DeviceFile(f).decode(dtype=torch.float16, out=caches, slots=slots, block_size=block)
    for l in (0, 13, 29):
        got = caches[l][0][slots // block, slots % block]  # [n, heads, dim]
        assert torch.equal(got.permute(1, 0, 2).unsqueeze(0).cpu(), ref.keys[l])


@needs_gpu
def test_gpu_encode_equals_cpu_encode():
    rng = np.random.default_rng(0)
    for rows, channels, alphabet in [(600, 193, 256), (17, 5, 3), (256, 384, 256)]:
        sym = rng.integers(0, alphabet, size=(rows, channels)).astype(np.uint8)
        freqs = tables.freqs_from_levels(tables.levels_from_counts(
            tables.channel_counts(sym, alphabet)))
        cpu = tables.native().encode(sym, freqs, 256)
        assert cuda.encode_symbols(sym, freqs, 256) == list(cpu)


@needs_gpu
@pytest.mark.parametrize("kernel", ["auto", "global"])
def test_damaged_blob_reports_status(kv_600, monkeypatch, kernel):
    data = kvcodec.encode(kv_600)
    with kvcodec.open(data) as f:
        dev = cuda.DeviceFile(f)
        _damage(f, 5, monkeypatch)
        with pytest.raises(CorruptError, match="chunk 0"):
            dev.decode(kernel=kernel)


def _damage(f, item: int, monkeypatch) -> None:
    """Cut one blob short, its checksum recomputed: it passes the reader's checks and must
    come back from the kernel as a status."""
    off, side, blob, crc = (list(x) for x in f.sections.item_lists())
    blob[item] -= 2
    crc[item] = container.crc32(f.source.read_range("payload", off[item], side[item] + blob[item]))
    monkeypatch.setattr(f.sections, "item_lists", lambda: (off, side, blob, crc))


@needs_gpu
def test_many_files_decode_in_one_launch(kv_600):
    """prepare_many: three entries (two configs, one of them not fused) into one paged
    cache and one contiguous destination, in one launch: each part equals its file's CPU
    decode bit for bit."""
    spans = [(0, 256, "default"), (256, 512, "lossless"), (512, 600, "default")]
    datas = [kvcodec.encode(kv_600.slice(a, b), config=c) for a, b, c in spans]
    refs = [kvcodec.decode(d, dtype=torch.bfloat16) for d in datas]
    block = 16
    slots = torch.randperm(64 * block, device="cuda")[:600].to(torch.int64)
    paged = [tuple(torch.zeros((64, block, 3, 64), dtype=torch.bfloat16, device="cuda")
                   for _ in range(2)) for _ in range(30)]
    files = [kvcodec.open(d) for d in datas]
    parts = [cuda.Part(cuda.DeviceFile(f), out=paged, slots=slots[a:b].contiguous(),
                       block_size=block) for f, (a, b, _) in zip(files, spans)]
    parts.append(cuda.Part(cuda.DeviceFile(files[1]), chunks=range(0, 1)))
    run = cuda.prepare_many(parts, dtype=torch.bfloat16)
    run.launch()
    outs = run.finish()
    assert outs[0] is paged and outs[2] is paged
    for l in (0, 7, 29):
        for kind in (0, 1):
            got = paged[l][kind][slots // block, slots % block].permute(1, 0, 2).unsqueeze(0)
            want = torch.cat([(r.keys, r.values)[kind][l] for r in refs], dim=2)
            assert torch.equal(got.cpu(), want), (l, kind)
            assert torch.equal(outs[3][l][kind].cpu(), (refs[1].keys, refs[1].values)[kind][l])


@needs_gpu
def test_a_damaged_entry_in_a_launch_is_reported_and_the_others_land(kv_600, monkeypatch):
    datas = [kvcodec.encode(kv_600.slice(a, a + 200)) for a in (0, 200, 400)]
    refs = [kvcodec.decode(d, dtype=torch.float16) for d in datas]
    files = [kvcodec.open(d) for d in datas]
    _damage(files[1], 7, monkeypatch)
    run = cuda.prepare_many([cuda.Part(cuda.DeviceFile(f)) for f in files])
    run.launch()
    outs, errors = run.finish(errors=True)
    assert errors[0] is None and errors[2] is None and outs[1] is None
    assert isinstance(errors[1], CorruptError) and "chunk 0" in str(errors[1])
    for i in (0, 2):
        assert all(torch.equal(outs[i][l][0].cpu(), refs[i].keys[l]) for l in range(30))
    run.launch()
    with pytest.raises(CorruptError, match="chunk 0"):
        run.finish()


@needs_gpu
def test_a_store_prefix_decodes_in_one_launch(kv_600, tmp_path, monkeypatch):
    """cuda_store.fill: a store's entries (coded with its shared tables, one set of device
    tables for all) into fp16 buffers on the GPU, equal to the CPU fill cast to fp16; a
    damaged middle entry ends the prefix before it and is moved aside."""
    from kvcodec.integrations import cuda_store
    from kvcodec.store import ChunkStore

    store = ChunkStore(tmp_path, kv_600.model)
    store.put(kv_600)
    ids = kv_600.token_ids
    locs = store.lookup(ids, partial=True)
    assert len(locs) == 3
    ref = [(torch.empty(1, 3, 600, 64), torch.empty(1, 3, 600, 64)) for _ in range(30)]
    assert store.fill(ref, ids, locs) == 600
    bufs = [tuple(torch.zeros(1, 3, 700, 64, dtype=torch.float16, device="cuda")
                  for _ in range(2)) for _ in range(30)]
    assert cuda_store.fill(store, bufs, ids, locs) == 600
    for l in range(30):
        for kind in (0, 1):
            assert torch.equal(bufs[l][kind][:, :, :600].cpu(), ref[l][kind].half()), (l, kind)
    with kvcodec.open(locs[0].read_bytes(), tables=store.shared_tables) as a, \
            kvcodec.open(locs[1].read_bytes(), tables=store.shared_tables) as b:
        assert a.meta.shared_tables is not None
        assert cuda.DeviceFile(a).tables is cuda.DeviceFile(b).tables
    real = store.open_entry

    def open_entry(loc, token_ids, t0, anchor=None):
        f = real(loc, token_ids, t0, anchor)
        if t0 == 256:
            _damage(f, 3, monkeypatch)
        return f
    monkeypatch.setattr(store, "open_entry", open_entry)
    assert cuda_store.fill(store, bufs, ids, locs) == 256
    assert not locs[1].exists() and locs[0].exists()


@needs_gpu
def test_a_prepared_decode_replays_in_a_cuda_graph(kv_600):
    """prepare() stages once; launch() is capturable (no allocation, host work or sync), and
    a replay followed by finish() gives the same tensors as the CPU decode."""
    data = kvcodec.encode(kv_600)
    ref = kvcodec.decode(data, dtype=torch.float16)
    with kvcodec.open(data) as f:
        run = cuda.DeviceFile(f).prepare(dtype=torch.float16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run.launch()  # warm-up outside the capture, as CUDA graphs want
        torch.cuda.current_stream().wait_stream(side)
        out = run.finish()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run.launch()
        for pair in out:
            for t in pair:
                t.zero_()
        graph.replay()
        out = run.finish()
    for l in range(30):
        assert torch.equal(out[l][0].cpu(), ref.keys[l])
        assert torch.equal(out[l][1].cpu(), ref.values[l])


@needs_gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="no compute-sanitizer")
def test_compute_sanitizer_memcheck(tmp_path, kv_600):
    """Every config, a chunk range, a paged destination and the encoder under memcheck (the
    files are encoded here, so the checked process only decodes and needs no model)."""
    names = []
    for i, cfg in enumerate(kvcodec.available_configs() + [_variant("sinks", 192)]):
        (tmp_path / f"{i}.kvc").write_bytes(kvcodec.encode(kv_600, config=cfg))
        names.append(str(tmp_path / f"{i}.kvc"))
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, numpy as np, torch, kvcodec\n"
        "from kvcodec.core import tables\nfrom kvcodec.integrations import cuda\n"
        "for name in sys.argv[1:]:\n"
        "    with kvcodec.open(name) as f:\n"
        "        dev = cuda.DeviceFile(f)\n"
        "        dev.decode()\n"
        "        dev.decode(chunks=range(1, 3), dtype=torch.float32)\n"
        "        n, h, d = f.meta.num_tokens, f.meta.num_kv_heads, f.meta.head_dim\n"
        "        slots = torch.randperm(64 * 16, device='cuda')[:n].to(torch.int64)\n"
        "        caches = [tuple(torch.zeros((64, 16, h, d), dtype=torch.bfloat16, device='cuda')\n"
        "                        for _ in range(2)) for _ in range(f.meta.num_layers)]\n"
        "        dev.decode(dtype=torch.bfloat16, out=caches, slots=slots, block_size=16)\n"
        "files = [kvcodec.open(name) for name in sys.argv[1:]]\n"
        "run = cuda.prepare_many([cuda.Part(cuda.DeviceFile(f)) for f in files])\n"
        "run.launch()\nrun.finish()\n"
        "sym = np.random.default_rng(0).integers(0, 200, size=(300, 193)).astype(np.uint8)\n"
        "freqs = tables.freqs_from_levels(tables.levels_from_counts(\n"
        "    tables.channel_counts(sym, 256)))\n"
        "cuda.encode_symbols(sym, freqs, 256)\n"
        "torch.cuda.synchronize()\n")
    r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
                        sys.executable, str(script)] + names, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
