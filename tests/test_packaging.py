"""kvcodec as a user installs it: a wheel built from the repository, installed into a
fresh virtual environment outside the repository, runs without the source tree."""
import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    dist = tmp_path / "dist"
    # The native build reuses the CMake tree of the editable install (build/), so this is
    # a relink, not a rebuild.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dist), str(ROOT)], check=True,
                   cwd=ROOT, timeout=900)
    (wheel,) = dist.glob("kvcodec_toolkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kvcodec/configs/default.json" in names
    assert "kvcodec/configs/calibrated/smollm2-135m-instruct.json" in names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA")))
    assert b"Name: kvcodec-toolkit" in meta and b"Requires-Dist: torch" in meta

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                    "--no-deps", str(wheel)], check=True, timeout=300)
    # Its dependencies (torch, transformers, ...) come from this environment's
    # site-packages, added as a plain path: that directory's .pth files (the editable
    # install of kvcodec among them) are not run.
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    info = subprocess.run([str(venv / "bin" / "kvcodec"), "info", "--json"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert report["kvcodec"] and "default" in report["configs"]
    code = """
import kvcodec, torch
assert kvcodec.__file__.startswith(%r), kvcodec.__file__
torch.manual_seed(0)
layers = [(torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)) for _ in range(3)]
data = kvcodec.encode(layers, config="default")
back = kvcodec.decode(data)
err = max(float((b - a).abs().max() / a.abs().max()) for (a, _), b in zip(layers, back.keys))
assert 0 < err < 0.5, err
assert kvcodec.decode(kvcodec.encode(layers, config="lossless")).keys[1].equal(layers[1][0])
print("ok", len(data))
""" % str(site)
    run = subprocess.run([str(py), "-c", code], cwd=work, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]
