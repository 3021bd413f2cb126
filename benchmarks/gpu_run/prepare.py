"""Prepare a GPU run on a machine without the embedded model (the device tool's: no
registry, no model): here, write ``devrun/kv2048h.kvc`` (2,048 tokens of the embedded
model's KV on GPL-3, fp16, lossless: what the tests and bench_cuda decode there) and
``.whl/`` (the wheels that machine's python3 lacks), both kept out of git through
``.git/info/exclude``. Then ``bash benchmarks/gpu_run/run.sh`` there (see its header).
"""
import dataclasses
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ["zstandard"]  # kvcodec's imports that the GPU image does not install


def main():
    exclude = ROOT / ".git" / "info" / "exclude"
    lines = exclude.read_text().splitlines() if exclude.exists() else []
    with exclude.open("a") as fh:
        for line in ("/devrun/", "/.whl/"):
            if line not in lines:
                fh.write(line + "\n")
    import kvcodec

    lm = kvcodec.load_model()
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    kv = kvcodec.capture_kv(lm, text, max_tokens=2048)
    kv = dataclasses.replace(kv, keys=[k.half() for k in kv.keys],
                             values=[v.half() for v in kv.values])
    (ROOT / "devrun").mkdir(exist_ok=True)
    (ROOT / "devrun" / "kv2048h.kvc").write_bytes(kvcodec.encode(kv, config="lossless"))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(ROOT / ".whl"), *WHEELS],
                   check=True)
    print("ready: devrun/ and .whl/ (carry both)")


if __name__ == "__main__":
    main()
