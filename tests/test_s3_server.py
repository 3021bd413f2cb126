"""benchmarks/s3_server.py, the S3 behind bench_vllm's real 1 Gbit/s link: moto's S3,
served with keep-alive connections (as S3 serves them), or by moto's own server, which
closes every connection after one response."""
import http.client
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "benchmarks" / "s3_server.py"


def _serve(kind: str):
    # Looked up, not imported: moto's server imports flask, whose proxies of the current
    # app raise on any attribute read outside a request, and vLLM's start-up reads every
    # module's attributes (later tests in this process would fail to start an engine).
    need = ["moto", "flask"] + (["uvicorn"] if kind == "keepalive" else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), "--server",
                             kind], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"s3_server.py --server {kind} exited with {proc.returncode}")
            time.sleep(0.1)
    proc.kill()
    pytest.fail("s3_server.py did not start")


def _two_requests(port: int) -> tuple:
    """Two GETs on one connection: the first response's Connection header, and whether
    the second was answered on the same socket."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        first = conn.getresponse()
        first.read()
        header, sock = first.getheader("Connection"), conn.sock
        conn.request("GET", "/")
        second = conn.getresponse()
        second.read()
        return header, second.status == 200 and sock is not None and conn.sock is sock
    finally:
        conn.close()


@pytest.mark.parametrize("kind", ["keepalive", "moto"])
def test_the_benchmarks_s3_is_moto_and_only_keepalive_keeps_connections(kind, monkeypatch):
    proc, port = _serve(kind)
    try:
        header, reused = _two_requests(port)
        if kind == "keepalive":
            assert header != "close" and reused
        else:  # Werkzeug's development server: one response per connection
            assert header == "close" and not reused
        import s3fs

        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.setenv(k, "bench")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"},
                               skip_instance_cache=True)
        fs.mkdir("bench")
        data = os.urandom(300_000)
        fs.pipe_file("bench/entry.kvc", data)
        assert fs.cat_file("bench/entry.kvc") == data
        assert fs.cat_file("bench/entry.kvc", start=10, end=20) == data[10:20]
    finally:
        proc.kill()
        proc.wait()
