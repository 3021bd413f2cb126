"""``kvcodec precompute``: the corpus job (kvcodec.jobs), in this process or on Ray."""
from __future__ import annotations

from pathlib import Path

import click

from kvcodec.errors import KVCodecError

from .common import (ByteSize, Duration, chat_options, check_chat, model_option, printable,
                     salt_option)


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--store", required=True,
              help="Store: a directory (created if missing) or an fsspec URL "
                   "(s3://bucket/kv, memory://kv, ...).")
@click.option("--config", "configs", multiple=True,
              help="Codec config (default: default); repeat it to store several quality "
                   "levels for bandwidth adaptation.")
@model_option
@click.option("--text-field", default="text", show_default=True,
              help="JSONL / Parquet: the field holding each document's text.")
@click.option("--id-field", default=None,
              help="JSONL / Parquet: the field holding each document's id (default: "
                   "file and line or row).")
@click.option("--max-tokens", type=int, default=None,
              help="Longest window; longer documents are cut into windows at chunk "
                   "boundaries (default: the model's context).")
@click.option("--independent", is_flag=True,
              help="Store each window as a position-independent document (behind the "
                   "model's anchor) for `generate --blend`.")
@click.option("--evict", default=None, metavar="POLICY:RATIO",
              help="Store each window evicted to RATIO of its tokens (e.g. snapkv:0.25), "
                   "one entry per window.")
@click.option("--batch-tokens", type=int, default=4096, show_default=True,
              help="Padded tokens per forward pass.")
@click.option("--runner", type=click.Choice(["local", "ray"]), default="local",
              show_default=True, help="Run in this process, or on Ray.")
@click.option("--num-workers", type=int, default=None,
              help="With --runner ray: actors (one CPU each; default 2).")
@click.option("--address", default=None,
              help="With --runner ray: an existing cluster (default: a local Ray).")
@click.option("--report", "report_path", default=None, type=click.Path(dir_okay=False),
              help="Also write the summary as JSON here, with the store's metrics "
                   "(kvcodec_* names) under \"metrics\" (local runner).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress bar on stderr.")
@click.option("--max-bytes", default=None, type=ByteSize(),
              help="Cap the store at this size (500M, 20G): least recently used entries "
                   "are evicted as the job writes.")
@click.option("--ttl", default=None, type=Duration(),
              help="Also evict entries not used for this long (12h, 7d).")
@chat_options
@salt_option
def precompute(inputs, store, configs, model, text_field, id_field, max_tokens, independent,
               evict, batch_tokens, runner, num_workers, address, report_path, progress,
               max_bytes, ttl, chat, system, salt):
    """Batch job: prefill every document of INPUTS once and store its KV chunks.

    INPUTS are text files, directories, globs, JSONL or Parquet files (local paths or
    fsspec URLs). Documents already stored are skipped without a prefill, so the same
    command finishes an interrupted job.
    """
    from kvcodec.core.paths import write_output
    from kvcodec.jobs import JobSpec, precompute as run

    check_chat(chat, system)
    if report_path and not Path(report_path).resolve().parent.is_dir():
        # Refused now, not after the job: the summary would have nowhere to go.
        raise click.BadParameter(f"its folder {Path(report_path).parent} does not exist",
                                 param_hint="--report")
    spec = JobSpec(configs=configs, independent=independent, evict=evict,
                   max_tokens=max_tokens, batch_tokens=batch_tokens, chat=chat, system=system,
                   salt=salt, max_bytes=max_bytes, ttl=ttl)
    summary = run(list(inputs), store, model=model, spec=spec, runner=runner,
                  num_workers=num_workers, address=address, text_field=text_field,
                  id_field=id_field, progress=progress)
    for line in summary.lines():
        click.echo(printable(line))  # ids and reasons come from the corpus
    if report_path:
        write_output(report_path, summary.to_json().encode() + b"\n")
    if summary.documents and summary.failed == summary.documents:
        raise KVCodecError("every document failed")
