"""Commands on .kvc files: encode, decode, inspect, and the build's backends (info)."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import click

import kvcodec
from kvcodec.core.paths import read_text

from .common import (Status, capture, chat_options, check_chat, model_option, parse_chunks,
                     printable)


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .kvc file to write.")
@click.option("--config", default="default", show_default=True,
              help=f"Config name ({', '.join(kvcodec.available_configs())}, or klt: "
                   "the model's, fitted on this cache where it has none) or JSON path.")
@model_option
@click.option("--max-tokens", type=click.IntRange(min=1), default=None,
              help="Use only the first N tokens of the text.")
@click.option("--chunk-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens per chunk (default 256).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Coder threads (0 = all cores).")
@click.option("--target-kl", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Ask for a quality instead of steps: the mean continuation KL "
                   "(nats/token) the config's rate curve for this model predicts "
                   "(needs a calibration: kvcodec calibrate [--fast]).")
@click.option("--independent", is_flag=True,
              help="Capture the text behind the model's anchor so that the file can be "
                   "placed anywhere in a prompt (kvcodec generate --blend).")
@click.option("--evict", "evict_spec", default=None, metavar="POLICY:RATIO",
              help="Keep only RATIO of each head's tokens, ranked by POLICY "
                   f"({', '.join(sorted(kvcodec.evict.POLICIES))}; wrap with +window), "
                   "scored during the capture, e.g. snapkv:0.25.")
@click.option("--embed-codebook", is_flag=True,
              help="For configs coded in KLT bases (calibrate --klt): put their codebook "
                   "into the file, so that it decodes where the codebook is not installed.")
@chat_options
def encode(source, output, config, model, max_tokens, chunk_tokens, threads, target_kl,
           independent, evict_spec, embed_codebook, chat, system):
    """Encode SOURCE into a .kvc file.

    SOURCE is a text file (run through the model to capture its KV cache) or a
    .safetensors file of K/V tensors as written by `kvcodec decode`.
    """
    from kvcodec.format import Encoder
    from kvcodec.format import io as kvio

    check_chat(chat, system)
    if not Path(output).resolve().parent.is_dir():  # as the write would, before a prefill
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), output)
    enc = None
    if source.endswith(".safetensors"):
        if independent or chat:
            raise click.UsageError("--independent and --chat capture a text; they do not "
                                   "apply to .safetensors input")
        kv = kvio.load_safetensors(source)
        if evict_spec:  # no attention to score by: knorm or streaming, after the fact
            kv = kvcodec.evict.evict(kv, *kvcodec.evict.parse(evict_spec))
    else:
        if independent and evict_spec:
            raise click.UsageError("--independent and --evict do not combine: blending "
                                   "needs every token of a chunk")
        if independent and chat:
            raise click.UsageError("--independent and --chat do not combine: a document "
                                   "placed inside a prompt carries no chat template")
        text = read_text(source)
        with Status("loading the model"):
            lm = kvcodec.load_model(model)
        # The config resolved before the prefill: a bad name, file or --target-kl (a
        # config without a rate curve) fails now, not after minutes of prefill.
        enc = Encoder(config, lm.fingerprint, chunk_tokens=chunk_tokens, threads=threads,
                      target_kl=target_kl, embed_codebook=embed_codebook)
        label = f"prefilling {Path(source).name}"
        if evict_spec:
            with kvcodec.evict.press(lm, *kvcodec.evict.parse(evict_spec)) as press:
                kv = press.evict(capture(lm, text, max_tokens, label, chat=chat,
                                         system=system))
        else:
            kv = capture(lm, text, max_tokens, label, independent, chat, system)
    if enc is None:
        enc = Encoder(config, kv.model, chunk_tokens=chunk_tokens, threads=threads,
                      target_kl=target_kl, embed_codebook=embed_codebook)
    with Status(f"encoding {kv.num_tokens} tokens x {kv.num_layers} layers"):
        data = enc.encode(kv, output)
    if enc.fitted is not None or (enc.embed_codebook and not embed_codebook):
        click.echo(f"no klt config for this model yet: fitted one on these {kv.num_tokens} "
                   "tokens, " + (f"kept as {enc.fitted} for later encodes" if enc.fitted
                                 else "not kept (see the warning); the file carries it"),
                   err=True)
    elif enc.fit_pending:
        from kvcodec.core.fit import FIRST_FIT_TOKENS

        click.echo(f"no klt config for this model yet, and these {kv.num_tokens} tokens do "
                   f"not fit one (a dense cache of {FIRST_FIT_TOKENS} tokens or more after "
                   "the sinks, at position 0): coded with default", err=True)
    kept = (f", {kv.stored_numel() / kv.numel():.0%} of tokens kept per head on average"
            if kv.evicted else "")
    # Said on stderr, as every status line: -o /dev/stdout sends the file to stdout.
    click.echo(f"wrote {output}: {len(data):,} bytes, "
               f"{len(data) * 8 / kv.numel():.3f} bits/element, "
               f"{kv.numel() * 2 / len(data):.1f}x smaller than fp16{kept}", err=True)


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The .safetensors file to write.")
@click.option("--chunks", default=None, help="Chunk range to decode, e.g. 0:4 (default all).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Output dtype (default: the encoded cache's).")
@click.option("--threads", type=int, default=0, show_default=True)
def decode(source, output, chunks, dtype, threads):
    """Decode a .kvc file into a safetensors file of K/V tensors."""
    from kvcodec.format import io as kvio
    from kvcodec.format import DTYPES

    with kvcodec.open(source) as f:
        sel = parse_chunks(chunks)
        with Status(f"decoding {source}"):
            kv = f.decode(sel, dtype=DTYPES[dtype] if dtype else None, threads=threads)
    kvio.save_safetensors(kv, output)
    click.echo(f"wrote {output}: {kv.num_layers} layers x {kv.num_tokens} tokens", err=True)


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(source, as_json):
    """Show what a .kvc file holds and how big each part is."""
    with kvcodec.open(source) as f:
        info = f.summary()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    # Names come from the file: possibly absent, of another type, or holding terminal
    # escapes; each is printed as one escaped line (the JSON output escapes them itself).
    model = info["model"] or {}
    rows = [
        ("file", f"{source} ({info['file_bytes']:,} bytes, format v{info['format_version']})"),
        ("model", f"{_name(model.get('architecture'))} layers={info['num_layers']} "
                  f"kv_heads={info['num_kv_heads']} head_dim={info['head_dim']}"),
        ("tokens", f"{info['num_tokens']} in {info['num_chunks']} chunks of {info['chunk_tokens']}"
                   + ("" if min(info["layer_tokens"]) == info["num_tokens"] else
                      f"; sliding-window layers hold {min(info['layer_tokens'])}")),
        ("config", _name(info["config"], "unnamed")
         + (f" (calibrated for {_name(info['calibrated_for'])})"
            if info["calibrated_for"] else "")),
        ("dtype", info["dtype"]),
        ("size", f"{info['bits_per_element']:.3f} bits/element all-in, "
                 f"{info['compression_vs_fp16']:.2f}x smaller than fp16"),
    ] + ([("tables", f"its store's shared tables {info['shared_tables']} (not counted above)")]
         if info["shared_tables"] else []) + ([("codebook", f"{info['codebook']} (" + (
             "in the file)" if "codebook" in info["sections"] else "named; not counted above)"))]
        if info["codebook"] else []) + [
        (f"  {name}", f"{size:,} bytes") for name, size in info["sections"].items()]
    rows = [(printable(k), printable(v)) for k, v in rows]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


def _name(value, missing: str = "unknown") -> str:
    """A name read from a file, for the table: ``missing`` when absent or empty."""
    return missing if value is None or value == "" else str(value)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(as_json):
    """Report the backends this build has (CPU coder, CUDA) and versions."""
    import platform

    import torch

    from kvcodec.core import tables
    from kvcodec.integrations import cuda

    nat = tables.native()
    cuda_device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    # cpu_decode: the rANS decode path this CPU runs ("avx512", "avx2" or "scalar";
    # KVCODEC_SIMD=avx2 or =scalar caps it); cpu_gather: how it reads its tables
    # ("hardware" gathers, or scalar "loads"), the faster of the two as timed on this
    # CPU (cpu_gather_probe_ms: that path's decode of the same synthetic blobs each way)
    # unless KVCODEC_GATHER sets it.
    hardware_s, loads_s = nat.gather_probe()
    report = {"cpu": True, "cpu_decode": nat.simd_path(), "cpu_gather": nat.simd_gather(),
              "cpu_gather_probe_ms": {"hardware": round(hardware_s * 1e3, 3),
                                      "loads": round(loads_s * 1e3, 3)},
              "cuda_compiled": cuda.compiled(),
              "cuda_device": cuda_device, "kvcodec": kvcodec.__version__,
              "bitstream": int(nat.BITSTREAM_VERSION), "lanes": int(nat.LANES),
              "prob_bits": int(nat.PROB_BITS), "torch": torch.__version__,
              "python": platform.python_version(), "configs": kvcodec.available_configs()}
    if as_json:
        click.echo(json.dumps(report))
    else:
        for k, v in report.items():
            click.echo(f"{k:20s} {v}")

