"""Session-scoped real model and real KV, shared by every test; an S3 server on loopback."""
import importlib.util
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import kvcodec
import pytest
import torch

torch.set_num_threads(2)


def real_texts() -> dict:
    """Real English documents that ship with Debian or Python."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    candidates = {
        "gpl3": Path("/usr/share/common-licenses/GPL-3"),
        "python_license": stdlib / "LICENSE.txt",
        "argparse_doc": None,
    }
    texts = {}
    for name, path in candidates.items():
        if path is not None and path.is_file():
            texts[name] = path.read_text(errors="replace")
    import argparse
    import textwrap
    texts["argparse_doc"] = textwrap.dedent(argparse.__doc__ or "") + "\n" + (
        Path(argparse.__file__).read_text())
    return texts


@pytest.fixture(scope="session")
def texts():
    return real_texts()


@pytest.fixture(scope="session")
def lm():
    return kvcodec.load_model()


@pytest.fixture(scope="session")
def bos_model_dir(tmp_path_factory):
    """The embedded model with a tokenizer that starts every sequence with BOS (as Llama 3,
    Gemma, Mistral and Phi-3 tokenizers do): its files, weights linked, not copied."""
    from transformers import AutoTokenizer

    from kvcodec.models.loading import resolve_model_path

    src = resolve_model_path(None)
    out = tmp_path_factory.mktemp("bos-model")
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            (out / f.name).symlink_to(f)
        elif f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    tok = AutoTokenizer.from_pretrained(src)
    tok.add_bos_token = True
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bos_lm(bos_model_dir):
    return kvcodec.load_model(str(bos_model_dir))


@pytest.fixture(scope="session")
def kv_600(lm, texts):
    """600 tokens of real KV: two full 256-token chunks and a partial one."""
    return kvcodec.capture_kv(lm, texts["python_license"], max_tokens=600)


@pytest.fixture(scope="session")
def kv_1536(lm, texts):
    return kvcodec.capture_kv(lm, texts["gpl3"], max_tokens=1536)


@pytest.fixture(scope="session")
def default_kvc(kv_600):
    return kvcodec.encode(kv_600, config="default")


# Every SIMD path with each way of reading its tables.
SIMD_GATHER_PATHS = ("avx2:hardware", "avx2:loads", "avx512:hardware", "avx512:loads")


def use_cpu_path(nat, path: str) -> bool:
    """Switch the native module ``nat`` to a CPU decode path: "scalar", "avx512", "avx2",
    or a SIMD path reading its tables with hardware gathers or scalar loads
    ("avx2:hardware", "avx512:loads", ...); False if this CPU lacks it. ``"auto"``: back
    to this CPU's own choice of both."""
    simd, _, gather = path.partition(":")
    return nat.set_simd_path(simd) and nat.set_simd_gather(gather or "auto")


def stacks_alike_on_every_path(files: list, layers=(0, 13, 29)) -> None:
    """``files`` (open consecutive entries of a store, from token 0) decoded as one
    stacked plan (the decoder writing each entry's sink rows) on every CPU path, into
    float32 and bfloat16: the bits of each entry decoded alone; then closed."""
    from kvcodec.core.tables import native
    from kvcodec.format.plan import execute
    from kvcodec.format.stacked import plan_stack

    spans = [(i * files[0].num_tokens, i * files[0].num_tokens + f.num_tokens)
             for i, f in enumerate(files)]
    alone = [f.decode() for f in files]
    m, nat = files[0].meta, native()
    try:
        for path in ("scalar", "avx2", "avx512"):
            if not use_cpu_path(nat, path):
                continue
            for dtype in (torch.float32, torch.bfloat16):
                shape = (1, m.num_kv_heads, spans[-1][1], m.head_dim)
                bufs = {l: (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                        for l in layers}
                plan = plan_stack(files, bufs, spans)
                assert plan is not None and all(
                    t.fused[0][0].sinks is not None for t in plan.targets)
                execute(plan, 2)
                for (a, b), one in zip(spans, alone):
                    for l in layers:
                        for got, want in ((bufs[l][0], one.keys[l]),
                                          (bufs[l][1], one.values[l])):
                            assert torch.equal(got[:, :, a:b], want.to(dtype)), (path, dtype)
    finally:
        use_cpu_path(nat, "auto")
        for f in files:
            f.close()


@pytest.fixture(scope="session")
def decode_on_every_cpu_path():
    """A function: ``data`` decoded on every CPU path this machine has (scalar, AVX2 and
    AVX-512, each with hardware gathers and with scalar loads), checked to give the same
    bits; returns the decodes, scalar first."""
    from kvcodec.core.tables import native

    def run(data):
        nat = native()
        paths = [p for p in ("scalar", *SIMD_GATHER_PATHS) if use_cpu_path(nat, p)]
        outs = []
        try:
            for p in paths:
                assert use_cpu_path(nat, p)
                outs.append(kvcodec.decode(data))
        finally:
            use_cpu_path(nat, "auto")
        for other in outs[1:]:
            for a, b in zip(outs[0].keys + outs[0].values, other.keys + other.values):
                assert torch.equal(a, b)
        return outs
    return run


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API: moto_server on 127.0.0.1 (a free port), bucket "kvtest", dummy
    credentials in the environment while it runs."""
    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install kvcodec-toolkit[s3])")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(name, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(endpoint, timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail("moto_server did not start")
                    time.sleep(0.2)
            s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).mkdir("kvtest")
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            proc.terminate()
            proc.wait(10)
