"""Centered streams (format version 5): a channel's mean is coded once per file, so a
channel that is mostly a constant offset does not size every token's step; older files
still decode as they did."""
import copy
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kvcodec
from kvcodec.core.config import load_config
from kvcodec.core.kvcache import KVCache
from kvcodec.core.quant import STEP_GRID, fit_stream, make_quantizer
from kvcodec.errors import CorruptError
from kvcodec.format import io as kvio

DATA = Path(__file__).parent / "data"
CENTERED = {"type": "uniform", "scale": "token", "center": True, "step": 0.4, "bins": 255}


def ref_centered(x, step, bins, n_sink=1):
    """The quantizer from its formula: the mean over the non-sink rows (float16), a
    per-token step on the 1/8-octave grid sized to the centered token's RMS."""
    r = (bins - 1) // 2
    mean = x[n_sink:].mean(dim=0).half().float()
    xc = x - mean
    target = xc.pow(2).mean(dim=1).sqrt() * step
    code = (torch.round(8 * torch.log2(target)) + 128).clamp(1, 255).long()
    s = torch.from_numpy(STEP_GRID)[code][:, None]
    q = torch.clamp(torch.round(xc / s), -r, r)
    return q + r, q * s + mean


def offset_cache(tokens=300, layers=2, heads=2, dim=64, offset=200.0):
    """Random keys with one channel per head that is mostly a constant (a key bias)."""
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, heads, tokens, dim, generator=g) for _ in range(layers)]
    for k in keys:
        k[..., 7] += offset
    values = [torch.randn(1, heads, tokens, dim, generator=g) for _ in range(layers)]
    return KVCache(keys, values, list(range(tokens)), None)


def no_rope(cfg):
    cfg = copy.deepcopy(cfg)
    cfg.pop("key_transform", None)
    return cfg


def test_centered_quantizer_matches_its_formula(kv_600):
    q = make_quantizer(CENTERED)
    assert q.param_names == ("mean",) and q.extra_channels == 1
    for layer in (0, 13, 29):
        x = kv_600.keys[layer][0].permute(1, 0, 2).reshape(600, -1).float()
        params = fit_stream(q, x, n_sink=1)
        sym, _ = q.quantize(x, params)
        y = q.dequantize(torch.from_numpy(sym), params, None)
        ref_q, ref_y = ref_centered(x, 0.4, 255)
        diff = (torch.from_numpy(sym[:, :-1]).float() - ref_q).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4  # rounding ties only
        same = diff == 0
        torch.testing.assert_close(y[same], ref_y[same], rtol=1e-5, atol=1e-4)


def test_a_constant_offset_channel_no_longer_sizes_the_step():
    """One channel 200x the others' spread, as a bias: uncentered, every token's step is
    sized to it and the other channels round to zero; centered, they keep their shape."""
    kv = offset_cache()
    cfg = no_rope(load_config("default"))
    plain = copy.deepcopy(cfg)
    plain["key"][0]["quantizer"].pop("center")
    errs = {}
    for name, c in (("centered", cfg), ("plain", plain)):
        dec = kvcodec.decode(kvcodec.encode(kv, config=c))
        k, d = kv.keys[0][..., 8:], dec.keys[0][..., 8:]  # channels past the offset one
        errs[name] = float((k - d).pow(2).mean() / k.var())
    assert errs["centered"] < 0.05 < 0.9 < errs["plain"], errs


def test_only_files_with_centered_streams_are_version_5(kv_600):
    from kvcodec.evict import evict

    def version(data):
        return struct.unpack_from("<I", data, 8)[0]

    assert version(kvcodec.encode(kv_600, config=load_config("default"))) == 5
    assert version(kvcodec.encode(kv_600, config="cachegen")) == 3
    ev = evict(kv_600, "snapkv", 0.5)
    assert version(kvcodec.encode(ev, config=load_config("default"))) == 5
    assert version(kvcodec.encode(ev, config="cachegen")) == 4
    with kvcodec.open(kvcodec.encode(kv_600, config=load_config("default"))) as f:
        assert f.summary()["format_version"] == 5


def test_an_older_version_claiming_centered_streams_is_corrupt(kv_600):
    data = bytearray(kvcodec.encode(kv_600, config=load_config("default")))
    struct.pack_into("<I", data, 8, 4)  # the preamble's version: not covered by a CRC
    with pytest.raises(CorruptError, match="centered"):
        kvcodec.open(bytes(data))


def test_a_bad_center_field_is_refused():
    with pytest.raises(kvcodec.ConfigError, match="center"):
        make_quantizer(dict(CENTERED, center="yes"))
    with pytest.raises(kvcodec.ConfigError, match="center"):
        make_quantizer({"type": "uniform", "scale": "channel", "center": True, "step": 0.5,
                        "bins": 255})


def test_format_v3_and_v4_files_still_decode_exactly():
    """Written by the release before version 5 (the then model-free default: per-token
    steps, uncentered) and decoded then; this release decodes them to the same bits."""
    with kvcodec.open(DATA / "format-v3.kvc") as f:
        assert f.summary()["format_version"] == 3
        got = f.decode()
    want = kvio.load_safetensors(DATA / "format-v3.decoded.safetensors")
    for a, b in zip(got.keys + got.values, want.keys + want.values):
        assert torch.equal(a, b)
    with kvcodec.open(DATA / "format-v4.kvc") as f:
        assert f.summary()["format_version"] == 4
        got = f.decode()
    want = load_file(DATA / "format-v4.decoded.safetensors")
    for layer in range(got.num_layers):
        assert torch.equal(got.keys[layer], want[f"k{layer}"])
        assert torch.equal(got.values[layer], want[f"v{layer}"])
        assert torch.equal(got.kept[layer], want[f"kept{layer}"])


def test_centered_decode_is_the_same_on_every_cpu_path(kv_600, decode_on_every_cpu_path):
    """The fused native dequantizer (scalar, AVX2) and the PyTorch formula give the same
    bits for centered streams, RoPE re-applied or not."""
    decode_on_every_cpu_path(kvcodec.encode(kv_600, config=load_config("default")))
