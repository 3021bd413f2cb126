"""``kvcodec`` CLI. Parses arguments and calls the library; errors print one line."""
from __future__ import annotations

import sys

import click

import kvcodec
from kvcodec.errors import KVCodecError

from . import files, jobs, quality, serve, serving
from . import store as store_commands
from .common import printable


class _App(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KVCodecError as exc:
            click.echo(f"error: {printable(exc)}", err=True)
            sys.exit(1)
        except OSError as exc:
            message = f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")
            click.echo(f"error: {printable(message)}", err=True)
            sys.exit(1)


@click.group(cls=_App)
@click.version_option(kvcodec.__version__, prog_name="kvcodec")
def main():
    """Compress transformer KV caches into .kvc files and load them back."""


# Each command group lives in its own module; the CLI only parses arguments and calls
# the library.
for _command in (files.encode, files.decode, files.inspect, files.info, quality.demo,
                 quality.eval_cmd, quality.calibrate, serving.generate, jobs.precompute,
                 serving.model_path, serve.serve, serve.blend_request, store_commands.store):
    main.add_command(_command)


if __name__ == "__main__":
    main()
