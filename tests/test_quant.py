"""Quantizers against plain PyTorch references written from their papers' formulas."""
import numpy as np
import pytest
import torch

from kvcodec.core.config import load_config, resolve_layers, validate_config
from kvcodec.errors import ConfigError
from kvcodec.core.quant import STEP_GRID, make_quantizer, token_step_multipliers


def flat(t):
    return t[0].float().permute(1, 0, 2).reshape(t.shape[2], -1)


def ref_cachegen(x, bins):
    m = bins // 2 - 1
    s = x.abs().max(dim=1, keepdim=True).values.half().float()
    q = torch.clamp(torch.round(x / s * m + m), 0, 2 * m)
    return q, (q - m) / m * s


def ref_uniform_token(x, step, bins, mult=None):
    r = (bins - 1) // 2
    target = torch.sqrt((x * x).mean(dim=1, keepdim=True)) * step
    if mult is not None:
        target = target * mult[:, None]
    s = torch.tensor(2.0) ** ((torch.round(8 * torch.log2(target)).clamp(-127, 127)) / 8)
    q = torch.clamp(torch.round(x / s), -r, r)
    return q + r, q * s


def ref_uniform_channel(x, step, bins):
    r = (bins - 1) // 2
    mean = x.mean(dim=0, keepdim=True).half().float()
    mad = (x - mean).abs().median(dim=0, keepdim=True).values
    s = (1.4826 * mad * step).half().float()
    q = torch.clamp(torch.round((x - mean) / s), -r, r)
    return q + r, q * s + mean


CASES = [
    ({"type": "absmax_token", "bins": 32}, lambda x: ref_cachegen(x, 32)),
    ({"type": "absmax_token", "bins": 16}, lambda x: ref_cachegen(x, 16)),
    ({"type": "uniform", "scale": "token", "step": 0.5, "bins": 63},
     lambda x: ref_uniform_token(x, 0.5, 63)),
    ({"type": "uniform", "scale": "channel", "step": 0.4, "bins": 255},
     lambda x: ref_uniform_channel(x, 0.4, 255)),
]


@pytest.mark.parametrize("spec,ref", CASES, ids=lambda c: str(c)[:60])
def test_quantizer_matches_reference_on_real_kv(kv_600, spec, ref):
    q = make_quantizer(spec)
    for layer in (0, 7, 29):
        for t in (kv_600.keys[layer], kv_600.values[layer]):
            x = flat(t)
            params = q.fit(x)
            sym, side = q.quantize(x, params)
            assert sym.dtype == np.uint8
            assert sym.shape == (x.shape[0], x.shape[1] + q.extra_channels)
            assert int(sym[:, :x.shape[1]].max()) < q.alphabet
            y = q.dequantize(torch.from_numpy(sym), params, side)
            ref_q, ref_y = ref(x)
            # Float evaluation order may flip a rounding tie; anything else is a bug.
            diff = (torch.from_numpy(sym[:, :x.shape[1]]).float() - ref_q).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-4
            same = diff == 0
            torch.testing.assert_close(y[same], ref_y[same], rtol=1e-5, atol=1e-5)


def test_uniform_token_never_clips(kv_600):
    """63 bins at step 0.5 cover |x| <= sqrt(C) * rms, the largest any token can have."""
    q = make_quantizer({"type": "uniform", "scale": "token", "step": 0.5, "bins": 63})
    x = flat(kv_600.keys[0])
    x[3] = 0
    x[3, 5] = 100.0  # all the energy in one channel: |x| / rms = sqrt(C)
    sym, side = q.quantize(x, {})
    y = q.dequantize(torch.from_numpy(sym), {}, side)
    step = torch.from_numpy(STEP_GRID[sym[:, -1]])[:, None]
    assert ((y - x).abs() <= step / 2 + 1e-4 * x.abs()).all()


def test_constant_and_zero_inputs():
    for spec in (c[0] for c in CASES):
        q = make_quantizer(spec)
        x = torch.zeros(10, 8)
        params = q.fit(x)
        sym, side = q.quantize(x, params)
        y = q.dequantize(torch.from_numpy(sym), params, side)
        assert torch.equal(y, x)


@pytest.mark.parametrize("spec", [
    {"type": "nope"}, {"type": "absmax_token"}, {"type": "absmax_token", "bins": 1000},
    {"type": "uniform", "bins": 63}, {"type": "uniform", "bins": 63, "step": -1},
    {"type": "uniform", "bins": 63, "step": 0.5, "scale": "head"}, "uniform",
])
def test_bad_quantizer_specs(spec):
    with pytest.raises(ConfigError):
        make_quantizer(spec)


def test_shipped_configs_resolve_every_layer():
    for name in ("default", "cachegen"):
        cfg = load_config(name)
        specs = resolve_layers(cfg, 30)
        assert len(specs["key"]) == len(specs["value"]) == 30
    cg = resolve_layers(load_config("cachegen"), 30)
    assert [s["bins"] for s in cg["key"]] == [32] * 10 + [16] * 20
    assert [s["bins"] for s in cg["value"]] == [32] * 2 + [16] * 28


@pytest.mark.parametrize("cfg", [
    {"key": [], "value": []},
    {"key": [{"layers": [0, 5], "quantizer": {"type": "absmax_token", "bins": 16}}],
     "value": [{"layers": [0, None], "quantizer": {"type": "absmax_token", "bins": 16}}]},
    {"chunk_tokens": 0, "key": [{"quantizer": {"type": "absmax_token", "bins": 16}}],
     "value": [{"quantizer": {"type": "absmax_token", "bins": 16}}]},
])
def test_bad_configs(cfg):
    with pytest.raises(ConfigError):
        resolve_layers(load_config(cfg), 30)


def ref_multipliers(imp, beta, lo, hi, skip):
    logs = [np.log(max(float(v), 1e-9)) for v in imp]
    mean = np.mean(logs[skip:])
    return torch.tensor([min(hi, max(lo, np.exp(-beta * (v - mean)))) for v in logs])


def test_token_step_multipliers_match_formula(kv_600):
    spec = {"beta": 0.2, "min": 0.5, "max": 1.5}
    imp = kv_600.importance[7]
    m = token_step_multipliers(imp, spec, skip=1)
    torch.testing.assert_close(m, ref_multipliers(imp, 0.2, 0.5, 1.5, 1).float(),
                               rtol=1e-5, atol=1e-6)
    assert float(m.min()) >= 0.5 and float(m.max()) <= 1.5
    # Attended tokens get finer steps: the multiplier falls as importance rises.
    order = torch.argsort(imp)
    assert bool((m[order][1:] <= m[order][:-1] + 1e-6).all())
    # Equal importance -> every step unchanged; beta 0 -> no effect.
    torch.testing.assert_close(token_step_multipliers(torch.full((9,), 0.1), spec), torch.ones(9))
    assert torch.equal(token_step_multipliers(imp, {**spec, "beta": 0}), torch.ones(len(imp)))


def test_uniform_token_with_step_multipliers_matches_reference(kv_600):
    q = make_quantizer({"type": "uniform", "scale": "token", "step": 0.5, "bins": 255})
    x = flat(kv_600.values[12])
    mult = token_step_multipliers(kv_600.importance[12], {"beta": 0.3, "min": 0.25, "max": 3.0})
    sym, side = q.quantize(x, {}, mult)
    ref_q, ref_y = ref_uniform_token(x, 0.5, 255, mult)
    diff = (torch.from_numpy(sym[:, :-1]).float() - ref_q).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    y = q.dequantize(torch.from_numpy(sym), {}, side)
    same = (diff == 0).all(dim=1)
    torch.testing.assert_close(y[same], ref_y[same], rtol=1e-5, atol=1e-5)
    plain, _ = q.quantize(x, {})
    # Important tokens (m < 1) got finer steps: more distinct symbols there.
    fine = mult < 0.8
    assert fine.any() and bool((sym[fine.numpy(), -1] < plain[fine.numpy(), -1]).all())


@pytest.mark.parametrize("bad", [{"beta": -1, "min": 0.5, "max": 1.5}, {"beta": 0.2},
                                 {"beta": 0.2, "min": 2, "max": 3}, "yes",
                                 {"beta": 0.2, "min": 0.5, "max": 1.5, "extra": 1}])
def test_bad_token_importance_specs(bad):
    cfg = load_config("default")
    cfg["token_importance"] = bad
    with pytest.raises(ConfigError, match="token_importance"):
        validate_config(cfg)


@pytest.mark.parametrize("field,value", [("sink_tokens", True), ("chunk_tokens", True)])
def test_a_json_true_is_no_count(field, value):
    """``"sink_tokens": true`` passed as the integer 1 and then failed in the encoder with
    a TypeError (found by a property test mutating shipped configs)."""
    with pytest.raises(ConfigError, match=field):
        load_config(dict(load_config("default"), **{field: value}))
    rules = [{"layers": [True, None], "quantizer": {"type": "absmax_token", "bins": 16}}]
    with pytest.raises(ConfigError, match="layers"):
        load_config({"key": rules, "value": rules})


def test_a_null_full_attention_key_scale_writes_a_file_that_reads():
    """A config's ``full_attention_key_scale: null`` went into the file's header, which
    its reader refuses ("not applied"): the encoder wrote what it could not read."""
    import kvcodec

    torch.manual_seed(0)
    kv = [(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)) for _ in range(3)]
    cfg = dict(load_config("default"), full_attention_key_scale=None)
    with kvcodec.open(kvcodec.encode(kv, config=cfg)) as f:
        assert f.decode().num_tokens == 40
