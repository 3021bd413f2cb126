"""Rate control: a KL target picks the steps from a measured rate curve; `kvcodec
calibrate --fast` measures one; a calibration that misses its target says so."""
import json

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.core.config import load_config
from kvcodec.core.rate import FACTOR_RANGE, factor_for_kl, for_target_kl, scale_steps
from kvcodec.errors import ConfigError
from kvcodec.quality.allocation import CLIP_MARGIN
from kvcodec_cli.main import main

CURVE = [[0.5, 0.002, 3.5], [1.0, 0.006, 2.6], [2.0, 0.02, 1.9]]


def test_the_factor_interpolates_log_kl_against_log_factor():
    assert factor_for_kl(CURVE, 0.006) == pytest.approx(1.0)
    assert factor_for_kl(CURVE, 0.002) == pytest.approx(0.5)
    # Halfway in log KL between two points is halfway in log factor.
    mid = (0.006 * 0.02) ** 0.5
    assert factor_for_kl(CURVE, mid) == pytest.approx(2 ** 0.5)
    # Past the ends: along the end segments, within the allowed range.
    assert factor_for_kl(CURVE, 0.001) < 0.5
    assert factor_for_kl(CURVE, 1e-12) == FACTOR_RANGE[0]
    assert factor_for_kl(CURVE, 50.0) == FACTOR_RANGE[1]
    # A noisy curve (KL dipping as the factor grows) is read as monotone.
    noisy = [[0.5, 0.003, 3.5], [1.0, 0.002, 2.6], [2.0, 0.02, 1.9]]
    assert 1.0 <= factor_for_kl(noisy, 0.005) <= 2.0


@pytest.mark.parametrize("bad", [None, [], [[1, 0.1, 2]], [[1, 0, 2], [2, 0.1, 1]],
                                 [[1, 0.1], [2, 0.2]], [["1", 0.1, 2], [2, 0.2, 1]]])
def test_bad_curves_and_targets_are_config_errors(bad):
    cfg = dict(load_config("default"), rate_curve=bad)
    with pytest.raises(ConfigError):
        for_target_kl(cfg, 0.01)
    with pytest.raises(ConfigError, match="target_kl"):
        factor_for_kl(CURVE, -1)


def test_a_target_scales_every_step_once():
    base = dict(load_config("default"), rate_curve=CURVE)
    got = load_config(base, target_kl=0.02)
    f = got["rate_factor"]
    assert f == pytest.approx(2.0)
    for kind in ("key", "value"):
        assert got[kind][0]["quantizer"]["step"] == pytest.approx(
            base[kind][0]["quantizer"]["step"] * f, rel=1e-5)
    # The result names its target, and its curve is relative to its own steps: loading it
    # again does not scale again.
    again = load_config(got)
    assert again[kind][0]["quantizer"]["step"] == got[kind][0]["quantizer"]["step"]
    assert factor_for_kl(again["rate_curve"], 0.02) == pytest.approx(1.0)
    # A config's own "target_kl" field applies the same way.
    field = load_config(dict(base, target_kl=0.02))
    assert field["key"][0]["quantizer"]["step"] == got["key"][0]["quantizer"]["step"]
    # A margin (held-out text runs above the calibration texts) aims below the target.
    assert load_config(dict(base, rate_margin=0.5), target_kl=0.012)["rate_factor"] == \
        pytest.approx(1.0)
    with pytest.raises(ConfigError, match="rate_margin"):
        load_config(dict(base, rate_margin=2), target_kl=0.01)
    # absmax quantizers scale their bins instead.
    cg = scale_steps(load_config("cachegen"), 2.0)
    assert cg["key"][0]["quantizer"]["bins"] < load_config("cachegen")["key"][0]["quantizer"]["bins"]


def test_a_target_without_a_curve_says_how_to_get_one(kv_600):
    with pytest.raises(ConfigError, match="calibrate --fast"):
        kvcodec.encode(kv_600, config=load_config("default"), target_kl=0.01)


def test_calibrate_fast_then_encode_to_a_target(tmp_path, monkeypatch, texts, kv_600):
    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "configs"))
    src = tmp_path / "t.txt"
    src.write_text(texts["gpl3"])
    r = CliRunner().invoke(main, ["calibrate", "--fast", "--text", str(src), "--target-kl",
                                  "0.03", "--prefill", "320", "--continuation", "48"])
    assert r.exit_code == 0, r.output
    made = list((tmp_path / "configs").glob("*.json"))
    assert len(made) == 1
    cfg = json.loads(made[0].read_text())
    assert cfg["calibration"]["fast"] and cfg["calibration"]["met"]
    assert cfg["calibration"]["per_layer"] and cfg["calibration"]["query_weighted"]
    channels = kv_600.num_kv_heads * kv_600.head_dim  # keys: a step multiplier per channel
    assert all(len(r["quantizer"]["head_scale"]) == channels for r in cfg["key"])
    assert all("head_scale" not in r["quantizer"] for r in cfg["value"])
    assert len(cfg["key"]) == len(cfg["value"]) == kv_600.num_layers
    assert cfg["calibration"]["kl"] <= cfg["calibration"]["aimed_kl"] < 0.03
    assert 0 < cfg["rate_margin"] < 1
    assert len(cfg["rate_curve"]) >= 6
    # encode picks it up as the model's default; a tighter target costs more bits.
    sizes = {t: len(kvcodec.encode(kv_600, config="default", target_kl=t))
             for t in (0.003, 0.03)}
    assert sizes[0.003] > sizes[0.03]
    with kvcodec.open(kvcodec.encode(kv_600, config="default", target_kl=0.003)) as f:
        assert f.config["target_kl"] == 0.003 and f.config["rate_factor"] < 1
    out = tmp_path / "x.kvc"
    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(out), "--max-tokens", "300",
                                  "--target-kl", "0.01"])
    assert r.exit_code == 0, r.output
    with kvcodec.open(out) as f:
        assert f.config["target_kl"] == 0.01


def test_a_finer_uniform_quantizer_keeps_its_range():
    """Rate control to finer steps grows bins with them (up to 255): a range cut with
    the step would clip what it covered (the shipped calibration's curve measured KL
    0.028 at x0.5 against 0.0036 at x0.7 before)."""
    q = {"type": "uniform", "scale": "token", "step": 0.6, "bins": 55}
    cfg = {"key": [{"layers": [0, None], "quantizer": q}],
           "value": [{"layers": [0, None], "quantizer": dict(q, bins=201)}]}
    half = scale_steps(cfg, 0.5)
    assert half["key"][0]["quantizer"]["bins"] == 109  # R 27 -> 54: the same range
    assert half["value"][0]["quantizer"]["bins"] == 255  # capped
    assert scale_steps(cfg, 2.0)["key"][0]["quantizer"]["bins"] == 55  # coarser: as it was


def test_calibrate_from_refines_the_shipped_calibration(tmp_path, monkeypatch, texts, kv_600):
    """--from keeps a calibration's steps, adds key steps per channel from the queries
    (clear of clipping) and its rate curve, so --target-kl works with it."""
    from kvcodec.core.config import calibrated_config_path

    monkeypatch.setenv("KVCODEC_CONFIG_DIR", str(tmp_path / "configs"))
    shipped = calibrated_config_path(kv_600.model)
    old = json.loads(shipped.read_text())
    src = tmp_path / "t.txt"
    src.write_text(texts["gpl3"])
    args = ["calibrate", "--from", str(shipped), "--text", str(src), "--prefill", "320",
            "--continuation", "48"]
    r = CliRunner().invoke(main, args + ["--no-query-weights"])
    assert r.exit_code == 0, r.output
    made = list((tmp_path / "configs").glob("*.json"))
    cfg = json.loads(made[0].read_text())
    assert cfg["model_key"] == old["model_key"] and cfg["name"] == "default"
    # Without query weights the steps stay (the range may grow), one rule per layer.
    assert [r["quantizer"]["step"] for r in cfg["key"]] == \
        [r["quantizer"]["step"] for r in old["key"]]
    assert cfg["calibration"]["target_kl"] == old["calibration"]["target_kl"]
    assert cfg["calibration"]["refined"]["texts"] == ["t.txt"]
    curve = cfg["rate_curve"]
    assert [p[0] for p in curve] == [0.5, 0.7, 1.0, 1.4, 2.0]
    assert all(a[2] > b[2] for a, b in zip(curve, curve[1:]))  # coarser, fewer bits
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads(made[0].read_text())
    channels = kv_600.num_kv_heads * kv_600.head_dim
    assert all(len(r["quantizer"]["head_scale"]) == channels for r in cfg["key"])
    assert "queries" in cfg["description"] and cfg["calibration"]["refined"]["query_weighted"]
    sizes = {t: len(kvcodec.encode(kv_600, config="default", target_kl=t))
             for t in (0.002, 0.02)}
    assert sizes[0.002] > sizes[0.02]
    assert cfg.get("rate_margin") == old.get("rate_margin")  # the source's, carried
    assert cfg["description"].count("calibrate --from") == 1  # not repeated by a re-run
    # --rate-margin: recorded, and --target-kl then aims that much lower on the curve.
    r = CliRunner().invoke(main, args + ["--rate-margin", "0.25"])
    assert r.exit_code == 0, r.output
    assert json.loads(made[0].read_text())["rate_margin"] == 0.25
    assert len(kvcodec.encode(kv_600, config="default", target_kl=0.02)) > sizes[0.02]
    r = CliRunner().invoke(main, args + ["--rate-margin", "1.5"])
    assert r.exit_code == 2 and "--rate-margin" in r.output
    # Another model's calibration, or --from with --fast, is refused in one line.
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(old, model_key="0" * 16)))
    r = CliRunner().invoke(main, ["calibrate", "--from", str(other), "--text", str(src)])
    assert r.exit_code == 1 and "another model" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["--fast"])
    assert r.exit_code == 2 and "--from" in r.output


def test_a_calibration_that_misses_its_target_writes_nothing_and_fails(tmp_path, texts):
    src = tmp_path / "t.txt"
    src.write_text(texts["gpl3"])
    out = tmp_path / "cal.json"
    r = CliRunner().invoke(main, ["calibrate", "--fast", "--text", str(src), "--target-kl",
                                  "1e-9", "--prefill", "320", "--continuation", "48",
                                  "-o", str(out)])
    assert r.exit_code != 0
    assert "missed its target" in r.output and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("args", [["--target-kl", "0"], ["--max-tokens", "0"],
                                  ["--chunk-tokens", "0"], ["--threads", "-1"]])
def test_encode_refuses_bad_numbers_before_any_work(tmp_path, args):
    src = tmp_path / "t.txt"
    src.write_text("hello")
    r = CliRunner().invoke(main, ["encode", str(src), "-o", str(tmp_path / "x.kvc"), *args])
    assert r.exit_code == 2 and "Invalid value" in r.output


def test_generate_refuses_a_negative_token_count(tmp_path):
    r = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--max-new-tokens", "-1"])
    assert r.exit_code == 2 and "Invalid value" in r.output


@pytest.fixture(scope="module")
def small_calibrator(lm, texts):
    from kvcodec.quality.calibrate import DEFAULT_TOKEN_IMPORTANCE, Calibrator

    ids = [kvcodec.models.text_ids(lm.tokenizer, texts[k])[:400]
           for k in ("gpl3", "python_license")]
    return Calibrator(lm, ids, 320, 48, DEFAULT_TOKEN_IMPORTANCE)


def test_fast_sets_a_step_per_layer_from_its_sensitivity(small_calibrator):
    cal = small_calibrator
    base = dict(load_config("default"), token_importance=cal.token_importance)
    sens = cal.layer_sensitivities(base)
    assert set(sens) == {(k, l) for k in ("key", "value") for l in range(cal.num_layers)}
    assert all(s > 0 for s in sens.values())
    cfg = cal.layer_config(base, sens, lowest=0.5)
    steps = {(k, r["layers"][0]): r["quantizer"]["step"] for k in ("key", "value")
             for r in cfg[k]}
    assert [r["layers"] for r in cfg["key"]] == [[l, l + 1] for l in range(cal.num_layers)]
    # More KL per element, a finer step (relative to the kind's base step), except where
    # the floor that keeps the layer's peak channel unclipped holds it.
    peaks = cal.peak_ratios(base)
    r = (base["key"][0]["quantizer"]["bins"] - 1) // 2
    floor = {k: CLIP_MARGIN * peaks[k].max() / (r * base["token_importance"]["min"] * 0.5)
             for k in sens}
    assert all(steps[k] >= floor[k] * (1 - 1e-4) for k in sens)
    free = [k for k in sens if steps[k] > floor[k] * 1.001]
    rel = {k: steps[k] / base[k[0]][0]["quantizer"]["step"] for k in free}
    order = sorted(free, key=lambda k: sens[k])
    assert all(rel[a] >= rel[b] * (1 - 1e-3) for a, b in zip(order, order[1:]))
    assert len({round(v, 3) for v in rel.values()}) > 3


def unclipped_keys(cal, cfg: dict, layer: int):
    """Quantize the first calibration text's keys of ``layer`` with ``cfg`` at the
    smallest token-importance multiplier (0.5) and check that nothing lands on the
    clamps; the layer's quantizer."""
    from kvcodec.core.config import resolve_layers
    from kvcodec.core.quant import fit_stream, make_quantizer
    from kvcodec.core.streams import stream_input
    from kvcodec.core.transforms import applied_key_transform, layer_ropes

    kv = cal.cases[0][0]
    xform, _ = applied_key_transform(cfg, kv.model, kv.num_layers, 0, kv.num_tokens)
    rope = layer_ropes(xform, kv.num_layers, kv.head_dim)[layer]
    q = make_quantizer(resolve_layers(cfg, kv.num_layers)["key"][layer], kv.dtype)
    x = stream_input(kv.keys[layer], "key", rope)[1:]
    sym, _ = q.quantize(x, fit_stream(q, x, 0), torch.full((len(x),), 0.5))
    coded = sym[:, :-1]
    assert coded.min() > 0 and coded.max() < 2 * q.r  # nothing at the clamps
    return q


def test_the_per_layer_floor_means_no_clipping_at_the_finest_factor(small_calibrator):
    cal = small_calibrator
    base = dict(load_config("default"), token_importance=cal.token_importance)
    # Pretend one layer's keys are 1e6x as sensitive as anything else: it wants a step far
    # below what its range (255 symbols) can hold, and gets the floor instead.
    sens = {(k, l): 1.0 for k in ("key", "value") for l in range(cal.num_layers)}
    sens[("key", 3)] = 1e6
    # ... and its peak channel gets the finest per-channel multiplier on top.
    peak = int(cal.peak_ratios(base)[("key", 3)].argmax())
    scale = {l: [1.0] * cal.channels for l in range(cal.num_layers)}
    scale[3][peak] = 0.25
    cfg = scale_steps(cal.layer_config(base, sens, lowest=0.5, channel_scale=scale), 0.5)
    unclipped_keys(cal, cfg, 3)
    # The sensitive layer's finest channel still gets a finer step than the next layer.
    assert cfg["key"][3]["quantizer"]["step"] * 0.25 < cfg["key"][4]["quantizer"]["step"]


def test_full_calibration_keeps_every_step_it_searches_unclipped(small_calibrator):
    """Full calibration with per-channel key multipliers: a very sensitive head wants a
    step that its 255 symbols cannot span, and its peak channel the finest multiplier
    on top. Every step the search meets stays above the clipping floor (before, the
    embedded model's own calibration clipped its way to KL 0.26 and missed)."""
    cal = small_calibrator
    sens = {(k, l): [1.0] * cal.kv_heads for k in ("key", "value") for l in range(cal.num_layers)}
    sens[("key", 3)] = [1e6] + [1.0] * (cal.kv_heads - 1)
    peaks = cal.peak_ratios({"key_transform": {"type": "rope_strip", "optional": True},
                             "key": [{"layers": [0, None], "quantizer": {
                                 "type": "uniform", "scale": "token", "center": True,
                                 "step": 1.0, "bins": 255}}],
                             "value": [{"layers": [0, None], "quantizer": {
                                 "type": "uniform", "scale": "token", "step": 1.0,
                                 "bins": 255}}]})
    peak = int(peaks[("key", 3)][:cal.channels // cal.kv_heads].argmax())  # in head 0
    scale = {l: [1.0] * cal.channels for l in range(cal.num_layers)}
    scale[3][peak] = 0.25
    cfg, info = cal.allocate(sens, target_kl=0.02, channel_scale=scale)
    assert info["met"]
    q = unclipped_keys(cal, cfg, 3)
    # The sensitive head is still coded finer than the others.
    mult = q.head_mult(cal.channels)
    d = cal.channels // cal.kv_heads
    assert float(mult[:d].median()) < float(mult[d:].median())


def test_a_near_miss_moves_the_fast_factor_a_little(monkeypatch):
    """The check after the rate-curve pick misses by 5%: the next factor comes from the
    curve with that miss on it (a few % finer), not a fixed 15% step that overshoots."""
    from kvcodec.quality.calibrate import Calibrator

    base = load_config("default")
    step0 = base["key"][0]["quantizer"]["step"]
    grid = (0.5, 0.7, 1.0, 1.4, 2.0)
    checks = []

    def kl(cfg, only=None, cases=None):
        f = cfg["key"][0]["quantizer"]["step"] / step0
        true = 0.005 * f ** 2
        if not any(abs(f - g) < 1e-9 for g in grid):  # a check, off the measured grid
            checks.append(f)
            true *= 1.05
        return true, 3.0 - f

    cal = Calibrator.__new__(Calibrator)
    cal.token_importance, cal.num_layers = None, 1
    monkeypatch.setattr(cal, "kl", kl)
    cfg, info = cal.fast(base, 0.01, factors=grid, margin=1.0, per_layer=False)
    assert info["met"] and len(checks) == 2
    assert 0.9 * checks[0] <= checks[1] <= 0.97 * checks[0] * (1 + 1e-4)
    assert info["kl"] > 0.01 * 0.85  # near the target, not 28% under it
    assert "full_attention_key_scale" not in cfg  # dropped from the base, not carried
