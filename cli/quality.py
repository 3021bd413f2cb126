"""Commands that measure and tune lossy settings: demo, eval, calibrate."""
from __future__ import annotations

import json
from pathlib import Path

import click

import kvcodec
from kvcodec.core.paths import read_text

from .common import Status, model_option, with_bar


@click.command()
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Document to use (default: a license text that ships with Debian/Python).")
@click.option("--max-tokens", type=int, default=1024, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default="out", show_default=True)
def demo(text, max_tokens, out_dir):
    """Capture KV of a real document, encode, decode, and continue generation from it."""
    from kvcodec.quality.demo import run_demo

    run_demo(text, max_tokens, out_dir, echo=click.echo)


@click.command(name="eval")
@model_option
@click.option("--text", "text_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text to prefill and continue.")
@click.option("--config", "configs", multiple=True,
              help="Config(s) to measure (repeatable; default: default and cachegen).")
@click.option("--prefill", type=int, default=1536, show_default=True)
@click.option("--continuation", type=int, default=256, show_default=True)
@click.option("--sweep", is_flag=True, help="Also scale each config's steps for an R-D curve.")
@click.option("--no-baselines", is_flag=True, help="Skip fp16/int8/KIVI/CacheGen baselines.")
@click.option("--json", "as_json", is_flag=True, help="Print {\"results\": [...]} as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Draw bits vs KL to this PNG (needs matplotlib).")
def eval_cmd(model, text_path, configs, prefill, continuation, sweep, no_baselines, as_json, plot):
    """Bits per element against model quality (KL, greedy agreement, perplexity)."""
    from kvcodec.quality import evaluate

    lm = kvcodec.load_model(model)
    ids = kvcodec.models.text_ids(lm.tokenizer, read_text(text_path))
    configs = list(configs) or ["default", "cachegen"]
    if sweep:
        configs = configs + [c for name in configs
                             for c in evaluate.sweep_configs(kvcodec.load_config(name, model=lm.fingerprint))]
    rows = evaluate.evaluate(lm, ids, configs, prefill=prefill, continuation=continuation,
                             baselines=not no_baselines)
    if plot:
        evaluate.plot(rows, plot)
    if as_json:
        click.echo(json.dumps({"results": rows}))
        return
    click.echo(f"{'name':18s} {'bits/elem':>9s} {'KL':>9s} {'top1':>7s} {'dPPL%':>8s} "
               f"{'+-SE':>5s}")
    for r in rows:
        se = r["delta_ppl_se_pct"]  # None with one scored token
        click.echo(f"{r['name']:18s} {r['bits_per_element']:9.3f} {r['kl']:9.5f} "
                   f"{r['top1_agreement']:7.3f} {r['delta_ppl_pct']:8.2f} "
                   + ("    -" if se is None else f"{se:5.2f}"))


@click.command()
@model_option
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text (repeatable; default: license and source texts that "
                   "ship with Debian and Python, none of them used by the benchmarks).")
@click.option("--target-kl", type=float, default=0.01, show_default=True,
              help="Mean KL (nats/token) the config must meet on the calibration texts.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Where to write the config (default: the user config directory, where "
                   "encode picks it up as this model's default).")
@click.option("--name", default=None,
              help="Config name (default: 'default', or the output file's stem with -o).")
@click.option("--alpha", type=float, default=0.35, show_default=True,
              help="Allocation exponent: steps ~ sensitivity^-alpha.")
@click.option("--per-layer", is_flag=True, help="One step per layer and K/V (default: per KV head).")
@click.option("--fast", is_flag=True,
              help="The model-free default with a step per layer and K/V (one probe "
                   "each, on one text) and one global factor measured on two texts (a "
                   "few minutes per 1B parameters on 2 cores) instead of a step per "
                   "layer, K/V and head (tens of minutes).")
@click.option("--query-weights/--no-query-weights", default=True, show_default=True,
              help="Key steps per channel from the energy of the queries that read "
                   "them (one extra prefill).")
@click.option("--prefill", type=int, default=None,
              help="Tokens prefilled per text [default: 1536; 1024 with --fast].")
@click.option("--continuation", type=int, default=None,
              help="Tokens scored per text [default: 256; 128 with --fast].")
@click.option("--token-importance/--no-token-importance", default=True, show_default=True,
              help="Scale per-token steps by the attention each token receives.")
@click.option("--rate-margin", type=float, default=None,
              help="Aim the calibration texts' KL this much below --target-kl, and record "
                   "it for encode --target-kl: held-out text runs above the calibration "
                   "texts [default: 0.7 with --fast, else 1].")
@click.option("--from", "source", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Refine this model's earlier calibration instead: keep its steps, add "
                   "key steps per channel from the queries (unless --no-query-weights) "
                   "and measure its rate curve (a few minutes; no sensitivity pass).")
@click.option("--klt", is_flag=True,
              help="Code every stream in per-head KLT bases fitted on the calibration texts "
                   "(format v7): a codebook written beside the config (--codebook-dir), "
                   "the rate curve measured again.")
@click.option("--codebook-dir", default=None, type=click.Path(file_okay=False),
              help="Where --klt writes the codebook [default: codebooks/ in the user config "
                   "directory, where readers look].")
def calibrate(model, texts, target_kl, output, name, alpha, per_layer, fast, query_weights,
              prefill, continuation, token_importance, rate_margin, source, klt,
              codebook_dir):
    """Choose per-layer, per-K/V, per-head steps that meet --target-kl in the fewest bits.

    The config is keyed to the model's fingerprint (weights included): written to the
    user config directory ($KVCODEC_CONFIG_DIR, else ~/.cache/kvcodec/configs), it is
    what `kvcodec encode --config default` uses for this model from then on. It carries
    the rate curve it measured, so `kvcodec encode --target-kl` can ask for a quality.
    A calibration that cannot meet its target writes nothing and exits non-zero.
    """
    from kvcodec.core.config import model_key
    from kvcodec.quality.calibrate import (DEFAULT_TOKEN_IMPORTANCE, FAST_MARGIN, Calibrator,
                                           default_calibration_texts)

    if target_kl <= 0:
        raise click.BadParameter("must be positive", param_hint="--target-kl")
    if rate_margin is not None and not 0 < rate_margin <= 1:
        raise click.BadParameter("must be in (0, 1]", param_hint="--rate-margin")
    if source and (fast or per_layer):
        raise click.BadParameter("refines a calibration as it is: not with --fast or "
                                 "--per-layer", param_hint="--from")
    prefill = prefill or (1024 if fast else 1536)
    continuation = continuation or (128 if fast else 256)
    if prefill < 16 or continuation < 2:
        raise click.BadParameter("--prefill must be >= 16 and --continuation >= 2")
    with Status("loading the model"):
        lm = kvcodec.load_model(model)
    key = model_key(lm.fingerprint)
    paths = [Path(t) for t in texts] or default_calibration_texts()
    if fast and not texts:
        paths = paths[:2]  # a license and a source file
    ids = [kvcodec.models.text_ids(lm.tokenizer, read_text(p)) for p in paths]
    with Status("prefilling calibration texts"):
        cal = Calibrator(lm, ids, prefill, continuation,
                         DEFAULT_TOKEN_IMPORTANCE if token_importance else None)
    minutes = cal.estimate_seconds(per_head=not per_layer, fast=fast,
                                 refine=bool(source)) / 60
    click.echo(f"calibrating {lm.fingerprint['architecture']} ({cal.num_layers} layers, "
               f"{cal.kv_heads} KV heads) on {len(cal.cases)} text(s): about "
               f"{minutes:.1f} min on this machine", err=True)
    klt = (codebook_dir,) if klt else None
    if source:
        return _refine(cal, lm, key, model, Path(source), output, name, query_weights,
                       paths, rate_margin, klt)
    if not fast:
        sens = with_bar("measuring sensitivities",
                        lambda p: cal.sensitivities(per_head=not per_layer, progress=p))
    if output is None:
        output = _default_output(model, key)
        name = name or "default"
    name = name or Path(output).stem
    if fast:
        from kvcodec.core.config import load_config

        base = load_config("default")  # the model-free default, not a calibration
        margin = FAST_MARGIN if rate_margin is None else rate_margin
        cfg, info = with_bar("measuring the rate curve",
                             lambda p: cal.fast(base, target_kl, p, margin=margin,
                                                query_weighted=query_weights))
        cfg["name"] = name
        cfg["description"] = (
            f"kvcodec calibrate --fast on {len(cal.cases)} text(s) for mean KL <= "
            f"{target_kl} ({prefill} tokens prefilled, {continuation} scored): the "
            f"model-free default with a step per layer and K/V from each one's measured "
            f"sensitivity (one text), "
            + ("key steps per channel from the energy of the queries that read them, "
               if query_weights else "") + f"then every step x{info['global_step']:.3f}.")
    else:
        desc = (f"Calibrated by kvcodec calibrate on {len(cal.cases)} text(s) for mean KL "
                f"<= {target_kl} ({prefill} tokens prefilled, {continuation} scored); "
                f"steps ~ sensitivity^-{alpha}, keys centered and coded before RoPE, 1 sink "
                "token in fp16" + (", per-token steps scaled by attention importance."
                                   if token_importance else "."))
        scale = None
        if query_weights:
            with Status("measuring query energy"):
                scale = cal.key_channel_scales({"key_transform": {"type": "rope_strip",
                                                                  "optional": True}})
            desc = desc[:-1] + "; key steps per channel from the energy of the queries."
        margin = 1.0 if rate_margin is None else rate_margin
        cfg, info = with_bar("searching the global step",
                             lambda p: cal.allocate(sens, target_kl * margin, alpha, p, name,
                                                    desc, channel_scale=scale))
        info["query_weighted"] = scale is not None
        if margin != 1:
            cfg["rate_margin"], info["aimed_kl"] = margin, target_kl * margin
    if not info["met"]:
        from kvcodec.errors import CalibrationError
        aimed = info.get("aimed_kl", target_kl)
        why = (f" x {aimed / target_kl:.2g}: calibration texts run below held-out text"
               if aimed != target_kl else "")
        raise CalibrationError(
            f"calibration missed its target: KL {info['kl']:.4f} > {aimed:.4g} "
            f"(--target-kl {target_kl}{why}) even at the finest step searched "
            f"(~{info['payload_bits_per_element']:.2f} bits/element); no config written. "
            "Use the model-free default, or a higher --target-kl")
    if klt:
        cfg, info = _klt(cal, cfg, info, klt[0], target_kl)
    cfg = {"name": cfg.pop("name"), "model_key": key,
           "model_name": kvcodec.models.model_name(model), **cfg}
    cfg["calibration"] = {"target_kl": target_kl, "texts": [p.name for p in paths],
                          "model": _recorded(lm), **info}
    _write(output, cfg, info)


def _klt(cal, cfg: dict, info: dict, folder, target_kl=None) -> tuple:
    """``--klt``: ``cfg`` coded in bases fitted on the calibration caches (the codebook
    saved in ``folder``), its rate curve measured again; with ``target_kl`` (a
    calibration that searched for one) the config records it, so that its steps land on
    the target along the new curve."""
    from kvcodec.core import codebook
    from kvcodec.quality.transform import calibration_caches, klt_config

    with Status("fitting per-head KLT bases"):
        out, book = klt_config(cfg, calibration_caches(cal),
                               note=f"kvcodec calibrate --klt for {cfg.get('name', '?')}")
    path = codebook.save(book, folder)
    factors = (0.5, 0.7, 1.0, 1.4, 2.0)
    points = with_bar("measuring the klt rate curve", lambda p: cal.rate_points(out, factors, p))
    out["rate_curve"] = sorted(points)
    if target_kl is not None:
        out["target_kl"] = target_kl
    out["description"] = (out.get("description", "").rstrip(".") + "; then every stream coded "
                          f"in per-head KLT bases (codebook {book.digest[:16]}, kvcodec "
                          "calibrate --klt).")
    click.echo(f"wrote codebook {path}", err=True)
    kl, bits = points[factors.index(1.0)][1:]
    return out, {**info, "kl": kl, "payload_bits_per_element": bits, "klt": True,
                 "codebook": book.digest}


def _default_output(model, key: str) -> Path:
    """Where a calibration of ``model`` goes without ``-o``: the user config directory,
    under its name and key, where ``encode`` finds it."""
    from kvcodec.core.config import user_config_dir

    output = user_config_dir() / f"{kvcodec.models.model_name(model)}-{key}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def _recorded(lm) -> dict:
    """The model's fingerprint as a calibration records it (without the RoPE tables)."""
    return {k: v for k, v in lm.fingerprint.items() if k != "rope"}


def _write(output, cfg: dict, info: dict) -> None:
    from kvcodec.core.paths import write_output

    write_output(output, (json.dumps(cfg, indent=1) + "\n").encode())
    click.echo(f"wrote {output}: calibration KL {info['kl']:.5f}, "
               f"~{info['payload_bits_per_element']:.3f} bits/element payload", err=True)


def _refine(cal, lm, key, model, source, output, name, query_weights, paths, rate_margin,
            klt=None):
    """``kvcodec calibrate --from``: the calibration at ``source`` kept at its steps, with
    query weights and a measured rate curve, written as :func:`calibrate` writes."""
    from kvcodec.core.config import load_config
    from kvcodec.errors import ConfigError

    old = load_config(str(source))
    if old.get("model_key") not in (None, key):
        raise ConfigError(f"{source} was calibrated for another model (key "
                          f"{old['model_key']}, this one {key})")
    cfg, info = with_bar("measuring the rate curve",
                         lambda p: cal.refine(old, query_weights, p))
    if klt:
        cfg, info = _klt(cal, cfg, info, klt[0])
    if rate_margin is not None:
        cfg["rate_margin"] = rate_margin
    if output is None:
        output = _default_output(model, key)
    said = "(kvcodec calibrate --from)"
    if query_weights and said not in cfg.get("description", ""):
        cfg["description"] = (cfg.get("description", "").rstrip(".") + "; then key steps "
                              f"per channel from the energy of the queries that read them {said}.")
    src = {k: v for k, v in (old.get("calibration") or {}).items() if k != "model"}
    rest = {k: v for k, v in cfg.items()
            if k not in ("name", "model_key", "model_name", "calibration")}
    cfg = {"name": name or old.get("name") or Path(output).stem, "model_key": key,
           "model_name": old.get("model_name") or kvcodec.models.model_name(model), **rest,
           "calibration": {**src, "model": _recorded(lm),
                           "refined": {**info, "texts": [p.name for p in paths]}}}
    _write(output, cfg, info)
