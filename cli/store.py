"""``kvcodec store``: operate a store (a directory or an fsspec URL) without a model:
stats, ls, verify, gc, rm. Every command has ``--json``; long ones show progress on
stderr."""
from __future__ import annotations

import datetime
import json
import sys

import click

from kvcodec.core.paths import loads_json
from kvcodec.errors import ConfigError

from .common import ByteSize, Duration, printable

def _admin(store, storage_options):
    from kvcodec.store.admin import StoreAdmin

    options = None
    if storage_options:
        try:
            options = loads_json(storage_options)
        except ValueError:
            raise ConfigError("--storage-options must be a JSON object") from None
        if not isinstance(options, dict):
            raise ConfigError("--storage-options must be a JSON object")
    return StoreAdmin(store, options)


def _common(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(fn)
    fn = click.option("--storage-options", default=None,
                      help="JSON options for a URL's filesystem (e.g. "
                           "'{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}').")(fn)
    return click.argument("store")(fn)


def _run(admin, label, fn, quiet):
    """``fn(progress)`` with a bar over the store's entries on stderr."""
    if quiet:
        return fn(None)
    total = sum(1 for _ in admin.backend.scan())
    with click.progressbar(length=max(total, 1), label=label, file=sys.stderr) as bar:
        return fn(bar.update)


def _when(t) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _size(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _filters(fn):
    fn = click.option("--model", default=None,
                      help="Entries of models whose label (architecture:hash) contains this.")(fn)
    fn = click.option("--config", default=None, help="Entries of this codec config.")(fn)
    fn = click.option("--kind", type=click.Choice(["prefix", "document", "evicted"]),
                      default=None, help="Entries of this kind.")(fn)
    return click.option("--older-than", type=Duration(), default=None,
                        help="Entries not used (read, or written) for this long: 90s, "
                             "30m, 12h, 7d.")(fn)


@click.group()
def store():
    """Operate a store (a directory or URL): stats, ls, verify, gc, rm."""


@store.command()
@_common
@click.option("--quiet", is_flag=True, help="No progress bar.")
def stats(store, as_json, storage_options, quiet):
    """Entries and bytes per model and config and per kind, oldest and newest use,
    damaged (.bad) files."""
    admin = _admin(store, storage_options)
    s = _run(admin, "reading headers", admin.stats, quiet or as_json)
    if as_json:
        click.echo(json.dumps(s))
        return
    click.echo(f"{printable(s['store'])}: {s['kvcodec_store_entries']} entries, "
               f"{_size(s['entry_bytes'])} ({_size(s['kvcodec_store_bytes'])} with "
               f"manifests, tables and journals)")
    for g in s["by_model_config"]:
        click.echo(f"  {printable(g['model'])}  {printable(g['config'])}: {g['entries']} "
                   f"entries, {g['tokens']} tokens, {_size(g['bytes'])}")
    click.echo("  kinds: " + ", ".join(f"{k} {v['entries']}" for k, v in s["by_kind"].items()))
    click.echo(f"  used: oldest {_when(s['oldest_use'])}, newest {_when(s['newest_use'])}; "
               f"{s['bad']} damaged (.bad) files, {_size(s['bad_bytes'])}")


@store.command()
@_common
@_filters
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N entries.")
def ls(store, as_json, storage_options, model, config, kind, older_than, limit):
    """List entries (least recently used first), with filters."""
    admin = _admin(store, storage_options)
    infos = admin.select(admin.entries(), model, config, kind, older_than)
    infos.sort(key=lambda i: i.last_read or i.mtime)
    infos = infos[:limit] if limit else infos
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos]))
        return
    for i in infos:
        click.echo(f"{i.name}  {i.kind:8s} {i.tokens:5d} tok  {_size(i.bytes):>10s}  "
                   f"{printable(i.config)}  {printable(i.model)}  used "
                   f"{_when(i.last_read or i.mtime)}"
                   + (f"  [{printable(i.error)}]" if i.error else ""))


@store.command()
@_common
@click.option("--quarantine", is_flag=True,
              help="Move damaged entries aside (*.kvc.bad); the next put writes them again.")
@click.option("--salt", "salts", multiple=True,
              help="A tenant's salt its entries were keyed with (repeat it); with these "
                   "and/or --unsalted, a first chunk whose key matches none is damaged.")
@click.option("--unsalted", is_flag=True,
              help="The store holds unsalted entries (see --salt).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify(store, as_json, storage_options, quarantine, salts, unsalted, quiet):
    """Check every entry's checksums (header, sections, every payload item), shared
    tables and tokens (as many token ids as tokens; the key of each prefix's first
    chunk, when its salt is known). Exits 1 if any entry is damaged or unreadable."""
    admin = _admin(store, storage_options)
    known = (list(salts) + ([None] if unsalted else [])) or None
    r = _run(admin, "verifying", lambda p: admin.verify(quarantine, p, known),
             quiet or as_json)
    if as_json:
        click.echo(json.dumps(r))
    else:
        click.echo(f"{printable(r['store'])}: {r['ok']} of {r['entries']} entries intact "
                   f"({_size(r['bytes'])} in {r['seconds']} s, {r['mb_per_s']} MB/s)")
        for d in r["damaged"]:
            click.echo(f"  damaged: {printable(d['name'])}: {printable(d['error'])}")
        for d in r["unreadable"]:
            click.echo(f"  unreadable now (left in place): {printable(d['name'])}: "
                       f"{printable(d['error'])}")
        if r["newer_version"]:
            click.echo(f"  {r['newer_version']} entries of a newer format (left in place; "
                       "a newer kvcodec reads them)")
        if r["quarantined"]:
            click.echo(f"  moved {r['quarantined']} damaged entries aside")
    if r["damaged"] or r["unreadable"]:
        sys.exit(1)


@store.command()
@_common
@click.option("--bad-older-than", default="7d", show_default=True,
              type=Duration(),
              help="Remove damaged (.bad) files older than this.")
@click.option("--max-bytes", default=None, type=ByteSize(),
              help="Evict least recently used entries until the store fits (500M, 20G).")
@click.option("--ttl", default=None, type=Duration(),
              help="Remove entries not used for this long (12h, 7d).")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
def gc(store, as_json, storage_options, bad_older_than, max_bytes, ttl, dry_run):
    """Remove stale temp files, old .bad files, and with --max-bytes/--ttl the least
    recently used entries."""
    admin = _admin(store, storage_options)
    r = admin.gc(bad_older_than, max_bytes, ttl, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(r))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{printable(r['store'])}: {verb} {r['temp_files']} temp files, "
               f"{r['bad_removed']} .bad files ({_size(r['bad_bytes'])})")
    if "eviction" in r:
        e = r["eviction"]
        age = e["removed_age_s"]
        unused = (f", unused for {age['min']:.0f}-{age['max']:.0f} s" if age else "")
        click.echo(f"  eviction: {verb} {e['removed']} entries ({_size(e['removed_bytes'])}, "
                   f"{e['expired']} past the TTL{unused}); {_size(e['bytes_after'])} left")


@store.command()
@_common
@_filters
@click.option("--doc", "docs", multiple=True,
              help="A document's id in a `kvcodec precompute` corpus (repeat it): its "
                   "entries and its manifest record go, so a rerun stores it again.")
@click.option("--all", "everything", is_flag=True, help="Every entry (no filter needed).")
@click.option("--dry-run", is_flag=True, help="Say what would go; remove nothing.")
def rm(store, as_json, storage_options, model, config, kind, older_than, docs, everything,
       dry_run):
    """Remove the entries that match every filter given (--all for every entry), or the
    documents --doc."""
    filters = (model, config, kind, older_than)
    if docs and (everything or any(v is not None for v in filters)):
        raise click.UsageError("--doc removes whole documents: give it without other filters")
    if not docs and not everything and all(v is None for v in filters):
        raise click.UsageError("give a filter (--model, --config, --kind, --older-than), "
                               "--doc or --all")
    admin = _admin(store, storage_options)
    if docs:
        r = admin.rm_documents(docs, dry_run)
        if as_json:
            click.echo(json.dumps(r))
            return
        click.echo(f"{printable(r['store'])}: {'would remove' if dry_run else 'removed'} "
                   f"{r['removed']} entries ({_size(r['bytes'])}) of {r['documents']} "
                   "documents")
        if r["not_found"]:
            click.echo("  not in any manifest: " + printable(", ".join(r["not_found"])))
        if r["unlisted"]:
            click.echo(f"  {r['unlisted']} records predate entry lists: remove those "
                       "entries with --model/--config/--older-than")
        return
    r = admin.rm(admin.select(admin.entries(), model, config, kind, older_than), dry_run)
    if as_json:
        click.echo(json.dumps(r))
        return
    click.echo(f"{printable(r['store'])}: {'would remove' if dry_run else 'removed'} "
               f"{r['removed']} entries ({_size(r['bytes'])})")
