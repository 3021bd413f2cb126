"""Rate-distortion tooling: eval table, baselines, calibration, on the real model."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.quality import baselines, evaluate
from kvcodec.quality.allocation import build_config
from kvcodec.quality.calibrate import Calibrator
from kvcodec.quality.simulate import simulate
from kvcodec.core.transforms import rope
from kvcodec_cli.main import main


@pytest.fixture(scope="module")
def ids(lm, texts):
    return lm.tokenizer(texts["gpl3"], add_special_tokens=False)["input_ids"]


def test_rope_strip_round_trips_and_matches_the_model(kv_600, lm):
    k = kv_600.keys[3]
    back = rope(rope(k, 100000.0, inverse=True), 100000.0)
    torch.testing.assert_close(back, k, atol=1e-4, rtol=1e-4)
    # Stripped keys are position-free: the pre-RoPE key of a token does not depend on
    # where it sits, so k_proj(hidden) recomputed here must match.
    attn = lm.model.model.layers[3].self_attn
    ids = torch.tensor([kv_600.token_ids[:40]])
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True)
        h = lm.model.model.layers[3].input_layernorm(out.hidden_states[3])
        pre = attn.k_proj(h).view(1, 40, 3, 64).transpose(1, 2)
    torch.testing.assert_close(rope(k[:, :, :40], 100000.0, inverse=True), pre, atol=2e-3, rtol=2e-3)


def test_eval_table_on_the_model(lm, ids):
    rows = evaluate.evaluate(lm, ids, ["default", "cachegen"], prefill=512, continuation=64)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"fp16", "int8", "kivi4", "kivi2", "cachegen", "default", "cachegen-kvc"}
    assert by["fp16"]["bits_per_element"] == 16 and by["fp16"]["kl"] < 1e-4
    assert by["fp16"]["top1_agreement"] == 1.0
    assert by["int8"]["bits_per_element"] == pytest.approx(8 + 16 / 192)
    assert by["kivi4"]["bits_per_element"] == pytest.approx(5.0, abs=0.01)
    assert by["kivi2"]["bits_per_element"] == pytest.approx(3.0, abs=0.01)
    assert by["int8"]["kl"] < by["kivi4"]["kl"] < by["kivi2"]["kl"]
    # Released CacheGen pays for per-chunk CDFs that the .kvc container does not.
    assert by["cachegen"]["bits_per_element"] > by["cachegen-kvc"]["bits_per_element"] + 0.3
    assert by["default"]["bits_per_element"] < by["cachegen-kvc"]["bits_per_element"]
    assert by["default"]["kl"] < by["cachegen"]["kl"]
    for r in rows:
        assert 0 <= r["top1_agreement"] <= 1 and r["kl"] >= 0
        assert r["delta_ppl_se_pct"] >= 0
    assert by["default"]["delta_ppl_se_pct"] > 0


def test_perplexity_change_comes_with_its_standard_error():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 50, generator=g)
    test = ref + 0.3 * torch.randn(300, 50, generator=g)
    targets = torch.randint(0, 50, (300,), generator=g).tolist()
    row = evaluate.compare_logits(ref, test, targets)
    d = (ref.log_softmax(-1) - test.log_softmax(-1)).double()[torch.arange(300), targets]
    ratio = float(torch.exp(d.mean()))
    assert row["delta_ppl_pct"] == pytest.approx(100 * (ratio - 1), rel=1e-5)
    se = 100 * ratio * float(d.std()) / 300 ** 0.5
    assert row["delta_ppl_se_pct"] == pytest.approx(se, rel=1e-5) and se > 0.5
    # No change has no error; one token has no spread to read it from.
    assert evaluate.compare_logits(ref, ref.clone(), targets)["delta_ppl_se_pct"] == 0
    assert evaluate.compare_logits(ref[:1], test[:1], targets[:1])["delta_ppl_se_pct"] is None
    from kvcodec.models.compare import ppl_change_text
    assert ppl_change_text(0.5234, 0.2) == "+0.52% +-0.20"
    assert ppl_change_text(-1.0, None) == "-1.00% +-?"  # printed as such, not as 0


def test_baselines_against_plain_formulas(kv_600):
    x = kv_600.values[2][0, 0, :64, :32].float()
    lo = x.amin(-1, keepdim=True).half().float()  # KIVI stores zero and scale in fp16
    scale = ((x.amax(-1, keepdim=True) - lo) / 15).half().float()
    ref = torch.clamp(torch.round((x - lo) / scale), 0, 15) * scale + lo
    torch.testing.assert_close(baselines._minmax(x, 4), ref)
    assert ((baselines._minmax(x, 4) - x).abs() <= scale * 0.51).all()


def test_sweep_is_monotone_in_bits(lm, ids):
    cfgs = evaluate.sweep_configs(kvcodec.load_config("default", model=lm.fingerprint), (0.7, 1.4))
    rows = evaluate.evaluate(lm, ids, cfgs, prefill=512, continuation=64, baselines=())
    assert rows[0]["bits_per_element"] > rows[1]["bits_per_element"]
    assert rows[0]["kl"] < rows[1]["kl"]


def test_calibration_meets_its_target(lm, ids):
    cal = Calibrator(lm, [ids], prefill=384, continuation=64)
    sens = cal.sensitivities(per_head=False)
    assert len(sens) == 60 and all(v[0] > 0 for v in sens.values())
    cfg, info = cal.allocate(sens, target_kl=0.02)
    assert info["kl"] <= 0.02
    looser, info2 = cal.allocate(sens, target_kl=0.08)
    assert info2["payload_bits_per_element"] < info["payload_bits_per_element"]
    # The config is a real one: it encodes, and decode equals the simulation.
    kv = cal.cases[0][0]
    dec = kvcodec.decode(kvcodec.encode(kv, config=cfg))
    ref = simulate(kv, cfg)
    assert all(torch.equal(a, b) for a, b in zip(dec.keys + dec.values, ref.keys + ref.values))


def test_build_config_never_clips():
    cfg = build_config("x", {(k, l): [0.2, 0.4, 0.8] for k in ("key", "value") for l in range(2)},
                       2, 3, 192)
    q = cfg["key"][0]["quantizer"]
    assert q["bins"] >= 2 * 192 ** 0.5 / 0.2 and len(q["head_scale"]) == 3


def test_build_config_spreads_key_steps_over_channels():
    """With per-channel key multipliers (calibrate's query weights) a key rule carries
    one multiplier per channel (its head's times the channel's), its range covers the
    finest channel, and value rules keep one per head."""
    steps = {(k, l): [0.2, 0.4, 0.8] for k in ("key", "value") for l in range(2)}
    scale = {l: [0.5 if c % 64 == 0 else 1.0 for c in range(192)] for l in range(2)}
    cfg = build_config("x", steps, 2, 3, 192, channel_scale=scale)
    key, value = cfg["key"][0]["quantizer"], cfg["value"][0]["quantizer"]
    assert len(key["head_scale"]) == 192 and len(value["head_scale"]) == 3
    mult = np.asarray(key["head_scale"]) * key["step"]
    assert np.allclose(mult[[0, 64, 128]], [0.1, 0.2, 0.4], rtol=1e-3)
    assert np.allclose(mult[[1, 65, 129]], [0.2, 0.4, 0.8], rtol=1e-3)
    assert key["bins"] >= 2 * 192 ** 0.5 / 0.1 or key["bins"] == 255


def test_eval_and_calibrate_cli(tmp_path, texts):
    src = tmp_path / "t.txt"
    src.write_text(texts["gpl3"])
    r = CliRunner().invoke(main, ["eval", "--text", str(src), "--prefill", "384",
                                  "--continuation", "48", "--json", "--config", "default"])
    assert r.exit_code == 0, r.output
    names = [row["name"] for row in json.loads(r.output)["results"]]
    assert names[:5] == ["fp16", "int8", "kivi4", "kivi2", "cachegen"] and "default" in names
    # Nothing to score is a one-line error (it was a traceback), and so is one position.
    for cont in ("0", "1"):
        r = CliRunner().invoke(main, ["eval", "--text", str(src), "--prefill", "384",
                                      "--continuation", cont, "--no-baselines"])
        assert r.exit_code != 0 and "continuation of at least 2" in r.output
        assert "Traceback" not in r.output
    out = tmp_path / "cal.json"
    r = CliRunner().invoke(main, ["calibrate", "--text", str(src), "--target-kl", "0.05",
                                  "--per-layer", "--prefill", "384", "--continuation", "48",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    cfg = kvcodec.load_config(out)
    assert cfg["name"] == "cal" and cfg["calibration"]["kl"] <= 0.05
    assert cfg["calibration"]["query_weighted"]  # keys: a step multiplier per channel
    assert all(len(r["quantizer"]["head_scale"]) == 192 for r in cfg["key"])


def test_kvtc_allocation_is_the_optimum_of_its_error_model():
    """Greedy bits (kvtc.allocate) against every allocation of a small budget: the least
    sum(variance * 4**-bits) with at most MAX_BITS per component and the budget in all."""
    import itertools

    from kvcodec.quality import kvtc

    var = torch.tensor([9.0, 4.0, 1.0, 0.3])
    for budget in (0, 3, 7, 12):
        got = kvtc.allocate(var, budget)
        assert got.sum() <= budget and got.max(initial=0) <= kvtc.MAX_BITS
        cost = lambda b: float((var * torch.tensor(4.0) ** -torch.tensor(b)).sum())  # noqa: E731
        best = min(cost(b) for b in itertools.product(range(kvtc.MAX_BITS + 1), repeat=4)
                   if sum(b) <= budget)
        assert cost(list(got)) == pytest.approx(best)
        assert list(got) == sorted(got, reverse=True)  # more variance, never fewer bits


def test_kvtc_baseline_reconstructs_and_counts_its_bits(lm, texts, kv_600):
    from kvcodec.quality import kvtc

    cal = kvcodec.capture_kv(lm, texts["gpl3"], max_tokens=700)
    bases = kvtc.fit([cal])
    n, numel = kv_600.num_tokens, kv_600.numel()
    # Everything in the window: fp16, 16 bits per element.
    whole, bits = kvtc.compress(kv_600, bases, 2.0, window=n)
    assert bits == numel * 16
    assert all(torch.equal(a, b.half().float()) for a, b in
               zip(whole.keys + whole.values, kv_600.keys + kv_600.values))
    errs, sizes = [], []
    for budget in (0.1, 0.3, 0.9):  # 0.9 bits of 5,760 features: under 8 bits x the rank
        rec, bits = kvtc.compress(kv_600, bases, budget, window=128)
        sizes.append(bits / numel)
        for a, b in zip(rec.keys + rec.values, kv_600.keys + kv_600.values):
            assert torch.equal(a[:, :, :4], b[:, :, :4].half().float())  # sinks
            assert torch.equal(a[:, :, -128:], b[:, :, -128:].half().float())  # window
        errs.append(sum(float((a - b).pow(2).sum()) for a, b in
                        zip(rec.keys + rec.values, kv_600.keys + kv_600.values)))
    assert sizes[0] < sizes[1] < sizes[2] and errs[0] > errs[1] > errs[2]
    # Keys come back rotated where they were: the error is a small part of their energy.
    energy = sum(float(b.pow(2).sum()) for b in kv_600.keys + kv_600.values)
    assert errs[2] < 0.1 * energy  # 7% here; keys turned 4 positions off: 17%
