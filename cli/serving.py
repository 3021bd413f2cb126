"""Commands that reuse caches for generation: generate (from a file or a store)
and precompute (fill a store)."""
from __future__ import annotations

from pathlib import Path

import click

import kvcodec
from kvcodec.core.paths import read_text
from kvcodec.errors import KVCodecError

from .common import Status, chat_options, check_chat, model_option, salt_option


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@model_option
@click.option("--blend", "blend_mode", is_flag=True,
              help="Blend the FILES (position-independent .kvc documents, from `kvcodec "
                   "encode --independent`), or with --store the --doc texts, in order, "
                   "between --system and --prompt, recomputing a fraction of their tokens.")
@click.option("--doc", "docs", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="With --blend --store: a document (text file) stored by `kvcodec "
                   "precompute --independent`; repeat it, in prompt order.")
@click.option("--system", default=None,
              help="With --blend: text before the documents; with --chat: the system message.")
@click.option("--recompute", type=float, default=0.15, show_default=True,
              help="With --blend: fraction of the documents' tokens recomputed (0..1).")
@click.option("--selector", default="hkvd", show_default=True,
              help="With --blend: which tokens to recompute: hkvd, query, boundary, random, "
                   "none or all.")
@click.option("--context", type=click.Path(exists=True, dir_okay=False),
              help="The cached document (.kvc).")
@click.option("--store", "store_dir", callback=lambda ctx, param, v: _store_arg(v),
              help="Instead of --context: a store (directory or URL) made by `kvcodec precompute`; the longest "
                   "cached prefix of --text (its partial last chunk too) is reused and the "
                   "rest prefilled.")
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
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.option("--compare", is_flag=True,
              help="Also prefill the document from its tokens and report agreement "
                   "(with --blend: and the KL of the answer's next-token distributions).")
@click.option("--chat", is_flag=True,
              help="The document and --prompt are one user turn of the model's chat template "
                   "(after --system), answered by the assistant; the store or file must have "
                   "been made with --chat too.")
@salt_option
def generate(files, model, blend_mode, docs, system, recompute, selector, context, store_dir,
             text_file, configs, bandwidth, budget, prompt, max_new_tokens, compare, chat,
             salt):
    """Continue from a cached document plus a new prompt, without prefilling the document.

    With --blend, several cached documents are fused into one prompt (CacheBlend-style
    selective recompute): kvcodec generate --blend a.kvc b.kvc --prompt "..."
    """
    import time

    from kvcodec.integrations import hf
    from kvcodec.quality import evaluate

    if blend_mode:
        if chat:
            raise click.UsageError("--chat does not go with --blend (blended documents carry "
                                   "no chat template)")
        return _blend(files, model, docs, store_dir, system, recompute, selector, prompt,
                      max_new_tokens, compare, bool(context or text_file or configs or
                                                    bandwidth or budget is not None), salt)
    if files or docs:
        raise click.UsageError("FILES and --doc go with --blend")
    check_chat(chat, system)
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
        from kvcodec.integrations.adapt import parse_bandwidth

        bandwidth = parse_bandwidth(bandwidth)
    lm = kvcodec.load_model(model)
    prompt_ids = kvcodec.models.prompt_ids(lm.tokenizer, prompt, chat=chat, system=system)
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
                                                   ("default",), bandwidth, budget, chat, system,
                                                   salt)
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


def _blend(files, model, docs, store_dir, system, recompute, selector, prompt,
           max_new_tokens, compare, other, salt=None):
    from kvcodec.blend import Cached, Text, compare_with_prefill, generate as blend_generate
    from kvcodec.store import ChunkStore

    if other:
        raise click.UsageError("--context, --text, --config, --bandwidth and --budget do not "
                               "go with --blend")
    if bool(files) == bool(store_dir):
        raise click.UsageError("--blend takes .kvc FILES, or --store DIR with --doc texts")
    if store_dir and not docs:
        raise click.UsageError("--blend --store needs --doc (the documents, in order)")
    if files and docs:
        raise click.UsageError("--doc goes with --store")
    lm = kvcodec.load_model(model)
    segs = [Text(system)] if system else []
    if files:
        segs += [Cached(f, name=f) for f in files]
    else:
        store = ChunkStore(store_dir, lm.fingerprint, salt=salt)
        segs += [Cached(store=store, text=read_text(d),
                        name=d) for d in docs]
    segs.append(Text(prompt))
    out, result = blend_generate(lm, segs, max_new_tokens=max_new_tokens, recompute=recompute,
                                 selector=selector)
    click.echo(lm.tokenizer.decode(out))
    click.echo(result.report.summary(), err=True)
    if compare:
        m = compare_with_prefill(lm, result, max_new_tokens)
        click.echo(f"full prefill: {lm.tokenizer.decode(m['prefill_tokens'])!r}", err=True)
        click.echo(f"against full prefill over its {len(m['prefill_tokens'])}-token answer: "
                   f"KL {m['kl']:.4f} nats/token, top-1 agreement {m['top1']:.1%}, "
                   f"greedy answer {'identical' if m['exact'] else 'differs'}; "
                   f"TTFT {result.report.seconds['total']:.2f}s vs prefill "
                   f"{m['prefill_s']:.2f}s", err=True)


def _store_arg(value):
    """A store given to generate: an existing directory, or an fsspec URL."""
    if value is None or "://" in value or Path(value).is_dir():
        return value
    raise click.BadParameter(f"no store directory {value!r} (a directory made by `kvcodec "
                             "precompute`, or a URL such as s3://bucket/kv)",
                             param_hint="--store")


def _from_store(lm, store_dir, text_file, configs, bandwidth, budget, chat=False, system=None,
                salt=None):
    """(cache, document ids, uncached document ids, description) for generate --store."""
    from kvcodec.integrations import adapt, hf
    from kvcodec.store import ChunkStore

    text = read_text(text_file)
    doc_ids = kvcodec.models.document_ids(lm.tokenizer, text, chat=chat, system=system)
    if not doc_ids:
        raise KVCodecError(f"{text_file} has no tokens")
    stores = [ChunkStore(store_dir, lm.fingerprint, c, salt=salt) for c in configs]
    if bandwidth is None:
        cache, n = hf.cache_from_store(lm.model, stores[0], doc_ids, partial=True)  # its end too
        return cache, doc_ids, doc_ids[n:], (f"{store_dir}: {n} of {len(doc_ids)} document "
                                             f"tokens cached, the rest prefilled")
    recompute_s, per_byte = adapt.measure_costs(lm, stores, doc_ids)
    cache, choices = adapt.load_adaptive(lm, stores, doc_ids, bandwidth, budget, recompute_s,
                                         decode_s_per_byte=per_byte)
    n = len(choices) * stores[0].chunk_tokens
    names = [c if c == adapt.RECOMPUTE else configs[c] for c in choices]
    return cache, doc_ids, doc_ids[n:], (f"{store_dir} at {bandwidth / 1e6:g} Mbit/s, budget "
                                         f"{budget:g}s: chunks {', '.join(names) or 'none'}")


@click.command(name="model-path")
@click.argument("model_arg", metavar="[MODEL]", required=False)
@model_option
def model_path(model_arg, model):
    """Print MODEL's local transformers directory, e.g. to serve it with vLLM, which cannot
    read GGUF on CPU. MODEL (or --model) is a .gguf file, converted to safetensors once and
    cached by its hash, or a model directory (printed as is); default: the embedded model."""
    from kvcodec.models.loading import model_config, resolve_model_path

    if model_arg and model and model_arg != model:
        raise click.UsageError("give the model once (MODEL or --model)")
    with Status("converting the model (once)"):
        path = resolve_model_path(model_arg or model)
    model_config(path)  # a model kvcodec cannot code is said here, not when vLLM starts
    click.echo(str(path))
