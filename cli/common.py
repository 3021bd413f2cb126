"""Helpers the command modules share: progress on stderr and argument parsing."""
from __future__ import annotations

import re
import sys

import click

import kvcodec
from kvcodec.errors import KVCodecError


def with_bar(label, fn):
    bar = click.progressbar(length=1, label=label, file=sys.stderr)
    state = {"done": 0}

    def progress(done, total):
        bar.length = total
        bar.update(done - state["done"])
        state["done"] = done

    with bar:
        return fn(progress)


def printable(value) -> str:
    """``value`` as one line of text that cannot drive the terminal: control and other
    non-printable characters (ESC, CR, newlines, bidi overrides...) escaped as
    ``\\x1b``, ``\\n``, ``\\u202e``. For every string that comes from a file or an
    error message."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


MODEL_HELP = ("Model: a transformers directory or a .gguf file (converted once and cached); "
              "default: the embedded SmolLM2-135M.")


def model_option(fn):
    """``--model``, the same in every command."""
    return click.option("--model", default=None, help=MODEL_HELP)(fn)


def chat_options(fn):
    """``--chat`` / ``--system``: the document as the start of a chat turn."""
    fn = click.option("--system", default=None,
                      help="With --chat: the system message before the document.")(fn)
    return click.option("--chat", is_flag=True,
                        help="Wrap the document in the model's chat template (a user turn "
                             "that starts with it, after --system), as a chat request about "
                             "it begins.")(fn)


def salt_option(fn):
    """``--salt``: a tenant's key salt (vLLM's ``cache_salt``), also from $KVCODEC_SALT so
    that the secret need not show in the process list."""
    return click.option("--salt", default=None, envvar="KVCODEC_SALT",
                        help="The tenant's salt (vLLM's cache_salt; or $KVCODEC_SALT): part "
                             "of every store key, so only requests of that salt hit the "
                             "entries.")(fn)


def check_chat(chat, system):
    if system is not None and not chat:
        raise click.UsageError("--system goes with --chat")


def capture(lm, text, max_tokens, label, independent: bool = False, chat: bool = False,
            system=None):
    """capture_kv with a progress bar over prefill steps; ``independent``: behind the
    model's anchor, position-independent (for blending); ``chat``: inside the model's
    chat template."""
    anchor = kvcodec.models.default_anchor(lm.tokenizer) if independent else None
    return with_bar(label, lambda p: kvcodec.capture_kv(lm, text, max_tokens=max_tokens,
                                                         progress=p, anchor=anchor, chat=chat,
                                                         system=system))


def parse_chunks(spec):
    if spec is None:
        return None
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            a, b = int(a) if a else None, int(b) if b else None
            if a is not None and b is not None and b <= a:
                raise KVCodecError(f"--chunks A:B selects chunks A to B - 1, so A < B; "
                                   f"got {spec!r}")
            return slice(a, b)
        return int(spec)
    except ValueError:
        raise KVCodecError(f"--chunks must be N or A:B, got {spec!r}") from None


class Status:
    """One line on stderr saying what a long step is doing (a spinner would need a thread)."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        if sys.stderr.isatty():
            click.echo(f"{self.what} ...", err=True)

    def __exit__(self, *exc):
        return False



_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ByteSize(click.ParamType):
    """A byte count: ``1000000``, ``500M``, ``20G`` (K/M/G/T: powers of 1024, as ``du -h``
    prints them; an optional ``B``/``iB`` is accepted)."""

    name = "BYTES"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.I)
        if not m or float(m[1]) * _BYTE_UNITS[m[2].upper()] < 1:
            self.fail(f"{value!r} is not a size (bytes, or a number with K, M, G or T)",
                      param, ctx)
        return int(float(m[1]) * _BYTE_UNITS[m[2].upper()])


class Duration(click.ParamType):
    """Seconds: ``3600``, ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""

    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
        if not m or float(m[1]) <= 0:
            self.fail(f"{value!r} is not a duration (e.g. 90s, 30m, 12h, 7d)", param, ctx)
        return float(m[1]) * _SECONDS[m[2]]
