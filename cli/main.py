"""``kvcodec`` CLI. Parses arguments and calls the library; errors print one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import kvcodec
from kvcodec.errors import KVCodecError


class _App(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KVCodecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)


@click.group(cls=_App)
@click.version_option(kvcodec.__version__, prog_name="kvcodec")
def main():
    """Compress transformer KV caches into .kvc files and load them back."""


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .kvc file to write.")
@click.option("--config", default="default", show_default=True,
              help=f"Config name ({', '.join(kvcodec.available_configs())}) or JSON path.")
@click.option("--model", default=None, help="Model directory (default: embedded SmolLM2-135M).")
@click.option("--max-tokens", type=int, default=None, help="Use only the first N tokens of the text.")
@click.option("--chunk-tokens", type=int, default=None, help="Tokens per chunk (default 256).")
@click.option("--threads", type=int, default=0, show_default=True, help="Coder threads (0 = all cores).")
def encode(source, output, config, model, max_tokens, chunk_tokens, threads):
    """Encode SOURCE into a .kvc file.

    SOURCE is a text file (run through the model to capture its KV cache) or a
    .safetensors file of K/V tensors as written by `kvcodec decode`.
    """
    from kvcodec import io as kvio

    if source.endswith(".safetensors"):
        kv = kvio.load_safetensors(source)
    else:
        text = Path(source).read_text(encoding="utf-8", errors="replace")
        with _status("loading the model"):
            lm = kvcodec.load_model(model)
        kv = _capture(lm, text, max_tokens, f"prefilling {Path(source).name}")
    with _status(f"encoding {kv.num_tokens} tokens x {kv.num_layers} layers"):
        data = kvcodec.encode(kv, output, config=config, chunk_tokens=chunk_tokens, threads=threads)
    click.echo(f"wrote {output}: {len(data):,} bytes, "
               f"{len(data) * 8 / kv.numel():.3f} bits/element, "
               f"{kv.numel() * 2 / len(data):.1f}x smaller than fp16")


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .safetensors file to write.")
@click.option("--chunks", default=None, help="Chunk range to decode, e.g. 0:4 (default all).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Output dtype (default: the encoded cache's).")
@click.option("--threads", type=int, default=0, show_default=True)
def decode(source, output, chunks, dtype, threads):
    """Decode a .kvc file into a safetensors file of K/V tensors."""
    from kvcodec import io as kvio
    from kvcodec.api import DTYPES

    with kvcodec.open(source) as f:
        sel = _parse_chunks(chunks)
        with _status(f"decoding {source}"):
            kv = f.decode(sel, dtype=DTYPES[dtype] if dtype else None, threads=threads)
    kvio.save_safetensors(kv, output)
    click.echo(f"wrote {output}: {kv.num_layers} layers x {kv.num_tokens} tokens")


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(source, as_json):
    """Show what a .kvc file holds and how big each part is."""
    with kvcodec.open(source) as f:
        info = f.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    model = info["model"] or {}
    rows = [
        ("file", f"{source} ({info['file_bytes']:,} bytes, format v{info['format_version']})"),
        ("model", f"{model.get('architecture', 'unknown')} layers={info['num_layers']} "
                  f"kv_heads={info['num_kv_heads']} head_dim={info['head_dim']}"),
        ("tokens", f"{info['num_tokens']} in {info['num_chunks']} chunks of {info['chunk_tokens']}"),
        ("config", info["config"]),
        ("dtype", info["dtype"]),
        ("size", f"{info['bits_per_element']:.3f} bits/element all-in, "
                 f"{info['compression_vs_fp16']:.2f}x smaller than fp16"),
    ] + [(f"  {name}", f"{size:,} bytes") for name, size in info["sections"].items()]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Document to use (default: a license text that ships with Debian/Python).")
@click.option("--max-tokens", type=int, default=1024, show_default=True)
@click.option("--out-dir", type=click.Path(file_okay=False), default="out", show_default=True)
def demo(text, max_tokens, out_dir):
    """Capture KV of a real document, encode, decode, and continue generation from it."""
    from kvcodec.demo import run_demo

    run_demo(text, max_tokens, out_dir, echo=click.echo)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json):
    """Report the backends this build has (CPU coder, CUDA) and versions."""
    import platform

    import torch

    from kvcodec import cuda, tables

    nat = tables.native()
    cuda_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {"cpu": True, "cuda_compiled": cuda.compiled(),
              "cuda_device": cuda_device, "kvcodec": kvcodec.__version__,
              "bitstream": int(nat.BITSTREAM_VERSION), "lanes": int(nat.LANES),
              "prob_bits": int(nat.PROB_BITS), "torch": torch.__version__,
              "python": platform.python_version(), "configs": kvcodec.available_configs()}
    if as_json:
        click.echo(json.dumps(report))
    else:
        for k, v in report.items():
            click.echo(f"{k:14s} {v}")


@main.command(name="eval")
@click.option("--model", default=None, help="Model directory (default: embedded SmolLM2-135M).")
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
    from kvcodec import evaluate

    lm = kvcodec.load_model(model)
    ids = lm.tokenizer(Path(text_path).read_text(errors="replace"),
                       add_special_tokens=False)["input_ids"]
    configs = list(configs) or ["default", "cachegen"]
    if sweep:
        configs = configs + [c for name in configs
                             for c in evaluate.sweep_configs(kvcodec.load_config(name))]
    rows = evaluate.evaluate(lm, ids, configs, prefill=prefill, continuation=continuation,
                             baselines=not no_baselines)
    if plot:
        evaluate.plot(rows, plot)
    if as_json:
        click.echo(json.dumps({"results": rows}))
        return
    click.echo(f"{'name':18s} {'bits/elem':>9s} {'KL':>9s} {'top1':>7s} {'dPPL%':>8s}")
    for r in rows:
        click.echo(f"{r['name']:18s} {r['bits_per_element']:9.3f} {r['kl']:9.5f} "
                   f"{r['top1_agreement']:7.3f} {r['delta_ppl_pct']:8.2f}")


@main.command()
@click.option("--model", default=None, help="Model directory (default: embedded SmolLM2-135M).")
@click.option("--text", "texts", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False), help="Calibration text (repeatable).")
@click.option("--target-kl", type=float, default=0.01, show_default=True,
              help="Mean KL (nats/token) the config must meet on the calibration texts.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
@click.option("--name", default=None, help="Config name (default: the output file's stem).")
@click.option("--alpha", type=float, default=0.35, show_default=True,
              help="Allocation exponent: steps ~ sensitivity^-alpha.")
@click.option("--per-layer", is_flag=True, help="One step per layer and K/V (default: per KV head).")
@click.option("--prefill", type=int, default=1536, show_default=True)
@click.option("--continuation", type=int, default=256, show_default=True)
@click.option("--token-importance/--no-token-importance", default=True, show_default=True,
              help="Scale per-token steps by the attention each token receives.")
def calibrate(model, texts, target_kl, output, name, alpha, per_layer, prefill, continuation,
              token_importance):
    """Choose per-layer, per-K/V, per-head steps that meet --target-kl in the fewest bits."""
    from kvcodec.calibrate import DEFAULT_TOKEN_IMPORTANCE, Calibrator
    from kvcodec.container import atomic_write

    lm = kvcodec.load_model(model)
    ids = [lm.tokenizer(Path(t).read_text(errors="replace"), add_special_tokens=False)["input_ids"]
           for t in texts]
    with _status("prefilling calibration texts"):
        cal = Calibrator(lm, ids, prefill, continuation,
                         DEFAULT_TOKEN_IMPORTANCE if token_importance else None)
    sens = _with_bar("measuring sensitivities",
                     lambda p: cal.sensitivities(per_head=not per_layer, progress=p))
    name = name or Path(output).stem
    desc = (f"Calibrated by kvcodec calibrate on {len(cal.cases)} text(s) for mean KL <= "
            f"{target_kl} ({prefill} tokens prefilled, {continuation} scored); "
            f"steps ~ sensitivity^-{alpha}, keys coded before RoPE, 1 sink token in fp16"
            + (", per-token steps scaled by attention importance." if token_importance else "."))
    cfg, info = _with_bar("searching the global step",
                          lambda p: cal.allocate(sens, target_kl, alpha, p, name, desc))
    cfg["calibration"] = {"target_kl": target_kl, "texts": [Path(t).name for t in texts],
                          "model": lm.fingerprint, **info}
    atomic_write(output, (json.dumps(cfg, indent=1) + "\n").encode())
    click.echo(f"wrote {output}: calibration KL {info['kl']:.5f}, "
               f"~{info['payload_bits_per_element']:.3f} bits/element payload")


@main.command()
@click.option("--model", default=None, help="Model directory (default: embedded SmolLM2-135M).")
@click.option("--context", type=click.Path(exists=True, dir_okay=False),
              help="The cached document (.kvc).")
@click.option("--store", "store_dir", type=click.Path(exists=True, file_okay=False),
              help="Instead of --context: a store made by `kvcodec precompute`; the longest "
                   "cached prefix of --text is reused and the rest prefilled.")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="With --store: the document the prompt follows.")
@click.option("--config", "configs", multiple=True,
              help="With --store: the store's config (default: default). Repeat it for "
                   "quality levels, best first, with --bandwidth and --budget.")
@click.option("--bandwidth", default=None,
              help="With --store: link bandwidth (1gbps, 200mbps, bits/s) for choosing levels.")
@click.option("--budget", type=float, default=None,
              help="With --bandwidth: seconds allowed for loading the document.")
@click.option("--prompt", required=True, help="Text that follows the cached document.")
@click.option("--max-new-tokens", type=int, default=48, show_default=True)
@click.option("--compare", is_flag=True,
              help="Also prefill the document from its tokens and report agreement.")
def generate(model, context, store_dir, text_file, configs, bandwidth, budget, prompt,
             max_new_tokens, compare):
    """Continue from a cached document plus a new prompt, without prefilling the document."""
    import time

    from kvcodec import evaluate, hf

    if (context is None) == (store_dir is None):
        raise click.UsageError("give exactly one of --context FILE.kvc and --store DIR")
    if store_dir is not None and text_file is None:
        raise click.UsageError("--store needs --text (the document the prompt follows)")
    if store_dir is None and (text_file or configs or bandwidth or budget is not None):
        raise click.UsageError("--text, --config, --bandwidth and --budget go with --store")
    if (bandwidth is None) != (budget is None):
        raise click.UsageError("--bandwidth and --budget go together")
    if len(configs) > 1 and bandwidth is None:
        raise click.UsageError("several --config levels need --bandwidth and --budget")
    if bandwidth is not None:
        from kvcodec.adapt import parse_bandwidth

        bandwidth = parse_bandwidth(bandwidth)
    lm = kvcodec.load_model(model)
    prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise KVCodecError("--prompt is empty")
    t = time.perf_counter()
    if context is not None:
        with kvcodec.open(context) as f:
            cache = hf.load_cache(lm.model, f, fingerprint=lm.fingerprint,
                                  reserve=len(prompt_ids) + max_new_tokens)
            doc_ids, rest, source = f.token_ids, [], context
    else:
        cache, doc_ids, rest, source = _from_store(lm, store_dir, text_file, configs or
                                                   ("default",), bandwidth, budget)
    out = evaluate.greedy_generate(lm, cache, rest + prompt_ids, max_new_tokens)
    elapsed = time.perf_counter() - t
    click.echo(lm.tokenizer.decode(out))
    click.echo(f"[{len(out)} tokens in {elapsed:.2f}s from {source}]", err=True)
    if compare:
        if doc_ids is None:
            raise KVCodecError(f"{context} carries no token ids; cannot prefill it to compare")
        ref_kv = kvcodec.capture_kv(lm, token_ids=doc_ids)
        ref = evaluate.greedy_generate(lm, ref_kv, prompt_ids, max_new_tokens)
        n = min(len(ref), len(out))
        same = sum(a == b for a, b in zip(ref, out))
        prefix = next((i for i in range(n) if ref[i] != out[i]), n)
        click.echo(f"full prefill: {lm.tokenizer.decode(ref)!r}", err=True)
        click.echo(f"agreement with full prefill: {same}/{max(len(ref), len(out))} tokens, "
                   f"identical for the first {prefix}", err=True)


def _from_store(lm, store_dir, text_file, configs, bandwidth, budget):
    """(cache, document ids, uncached document ids, description) for generate --store."""
    from kvcodec import adapt
    from kvcodec.store import Store

    text = Path(text_file).read_text(encoding="utf-8", errors="replace")
    doc_ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not doc_ids:
        raise KVCodecError(f"{text_file} has no tokens")
    stores = [Store(store_dir, lm.fingerprint, c) for c in configs]
    if bandwidth is None:
        cache, n = stores[0].load_cache(lm.model, doc_ids)
        return cache, doc_ids, doc_ids[n:], (f"{store_dir}: {n} of {len(doc_ids)} document "
                                             f"tokens cached, the rest prefilled")
    recompute_s, per_byte = adapt.measure_costs(lm, stores, doc_ids)
    cache, choices = adapt.load_adaptive(lm, stores, doc_ids, bandwidth, budget, recompute_s,
                                         decode_s_per_byte=per_byte)
    n = len(choices) * stores[0].chunk_tokens
    names = [c if c == adapt.RECOMPUTE else configs[c] for c in choices]
    return cache, doc_ids, doc_ids[n:], (f"{store_dir} at {bandwidth / 1e6:g} Mbit/s, budget "
                                         f"{budget:g}s: chunks {', '.join(names) or 'none'}")


@main.command()
@click.argument("texts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--store", "store_dir", required=True, type=click.Path(file_okay=False),
              help="Store directory (created if missing).")
@click.option("--config", "configs", multiple=True,
              help="Codec config (default: default); repeat it to store several quality "
                   "levels for bandwidth adaptation.")
@click.option("--model", default=None, help="Model directory (default: embedded SmolLM2-135M).")
@click.option("--max-tokens", type=int, default=None)
def precompute(texts, store_dir, configs, model, max_tokens):
    """Batch job: prefill each text once and store its chunks for prefix reuse."""
    from kvcodec.store import Store

    lm = kvcodec.load_model(model)
    stores = [Store(store_dir, lm.fingerprint, c) for c in configs or ("default",)]
    total = 0
    for path in texts:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        kv = _capture(lm, text, max_tokens, f"prefilling {Path(path).name}")
        n = sum(store.put(kv) for store in stores)
        total += n
        click.echo(f"{path}: {kv.num_tokens} tokens, {n} new chunks")
    click.echo(f"stored {total} new chunks in {store_dir}")


def _with_bar(label, fn):
    bar = click.progressbar(length=1, label=label, file=sys.stderr)
    state = {"done": 0}

    def progress(done, total):
        bar.length = total
        bar.update(done - state["done"])
        state["done"] = done

    with bar:
        return fn(progress)


def _capture(lm, text, max_tokens, label):
    """capture_kv with a progress bar over prefill steps."""
    return _with_bar(label, lambda p: kvcodec.capture_kv(lm, text, max_tokens=max_tokens,
                                                         progress=p))


def _parse_chunks(spec):
    if spec is None:
        return None
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            return slice(int(a) if a else None, int(b) if b else None)
        return int(spec)
    except ValueError:
        raise KVCodecError(f"--chunks must be N or A:B, got {spec!r}") from None


class _status:
    """One line on stderr saying what a long step is doing (a spinner would need a thread)."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        if sys.stderr.isatty():
            click.echo(f"{self.what} ...", err=True)

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
