"""The CUDA coder: same bytes as the CPU coder both ways, fused decode into HF and paged
caches. Everything that needs a GPU skips cleanly without one."""
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
    # The host staging copies these structs byte for byte into the kernels' arrays.
    assert nat.DECODE_ITEM_BYTES == 152 and nat.ENCODE_ITEM_BYTES == 48


def test_missing_gpu_is_a_clear_error(default_kvc):
    if cuda.available():
        pytest.skip("a GPU is present")
    with kvcodec.open(default_kvc) as f:
        with pytest.raises(BackendError, match="CUDA|GPU"):
            cuda.DeviceFile(f)


@needs_gpu
@pytest.mark.parametrize("cfg", kvcodec.available_configs())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_decode_equals_cpu_decode(kv_600, cfg, dtype):
    data = kvcodec.encode(kv_600, config=cfg)
    ref = kvcodec.decode(data, dtype=dtype)
    with kvcodec.open(data) as f:
        out = cuda.DeviceFile(f).decode(dtype=dtype)
        part = cuda.DeviceFile(f).decode(chunks=range(1, 3), dtype=dtype)
    for l in range(30):
        assert torch.equal(out[l][0].cpu(), ref.keys[l])
        assert torch.equal(out[l][1].cpu(), ref.values[l])
        assert torch.equal(part[l][0].cpu(), ref.keys[l][:, :, 256:600])


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
def test_damaged_blob_reports_status(kv_600):
    data = bytearray(kvcodec.encode(kv_600))
    with kvcodec.open(bytes(data)) as f:
        dev = cuda.DeviceFile(f)
        # A blob cut short (its checksum recomputed) must come back as a status.
        e = f.sections.index()[5]
        e["blob"] = int(e["blob"]) - 2
        raw = f.source.read_range("payload", int(e["off"]), int(e["side"]) + int(e["blob"]))
        e["crc"] = container.crc32(raw)
        with pytest.raises(CorruptError, match="chunk"):
            dev.decode()


@needs_gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="no compute-sanitizer")
def test_compute_sanitizer_memcheck(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import kvcodec, torch\nfrom kvcodec.integrations import cuda\n"
        "lm = kvcodec.load_model()\n"
        "kv = kvcodec.capture_kv(lm, 'The quick brown fox jumps over the lazy dog. ' * 40)\n"
        "data = kvcodec.encode(kv)\n"
        "with kvcodec.open(data) as f:\n    cuda.DeviceFile(f).decode()\n"
        "torch.cuda.synchronize()\n")
    r = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3",
                        sys.executable, str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
