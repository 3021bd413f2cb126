"""moto's S3 on 127.0.0.1, served with keep-alive connections, as S3 serves them.

    python benchmarks/s3_server.py --port 9000 [--server keepalive|moto]

moto's own server (``python -m moto.server``: Werkzeug's development server) answers
every request with ``Connection: close``, so a client opens a new TCP connection for
every GET. Behind ``throttle.py`` that is two new connections per GET (the client's to
the relay, the relay's to moto) and their set-up and tear-down in three processes that
share the benchmark's cores: the 8 GETs of a 2k-token prompt's entries through a 1
Gbit/s relay took 62-65 ms with moto's server, 53-54 ms with this one (2-core Xeon VM,
2026-12-07), where the link itself takes 42 ms. S3 keeps a connection for many
requests, and botocore's pool reuses it. ``keepalive`` (the default) serves the same
moto application with uvicorn (HTTP/1.1 keep-alive; installed with vLLM); ``moto`` is
moto's own server, as ``bench_vllm.py`` used before.
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--server", choices=("keepalive", "moto"), default="keepalive")
    args = ap.parse_args()
    os.environ.setdefault("MOTO_PORT", str(args.port))  # what moto's own server sets
    if args.server == "moto":
        sys.argv = ["moto.server", "-H", "127.0.0.1", "-p", str(args.port)]
        runpy.run_module("moto.server", run_name="__main__")
        return
    import uvicorn
    from moto.server import DomainDispatcherApplication, create_backend_app

    app = DomainDispatcherApplication(create_backend_app)
    uvicorn.run(app, host="127.0.0.1", port=args.port, interface="wsgi", log_level="warning")


if __name__ == "__main__":
    main()
