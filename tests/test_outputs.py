"""Files a user names as outputs (``encode(kv, path)``, ``-o``): a regular file is
written crash-safely where it is (through a symlink), and a device, a FIFO or
/dev/stdout is written into. The temp-file-and-rename made each a regular file: as
root, ``kvcodec decode x.kvc -o /dev/null`` replaced the system's /dev/null."""
import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import kvcodec
from kvcodec.core import paths
from kvcodec.format.io import load_safetensors
from kvcodec_cli.main import main

DATA = Path(__file__).parent / "data"


@pytest.fixture
def kv():
    gen = torch.Generator().manual_seed(0)
    return kvcodec.KVCache([torch.randn(1, 2, 40, 16, generator=gen) for _ in range(2)],
                           [torch.randn(1, 2, 40, 16, generator=gen) for _ in range(2)])


def _reader(fifo, got):
    def read():
        with open(fifo, "rb") as f:
            got.append(f.read())
    return threading.Thread(target=read, daemon=True)


def test_a_fifo_output_is_written_into_for_its_reader(tmp_path, kv):
    fifo = tmp_path / "out.kvc"
    os.mkfifo(fifo)
    got = []
    reader = _reader(fifo, got)
    reader.start()
    data = kvcodec.encode(kv, fifo, config="lossless")
    reader.join(60)
    assert got == [data] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    # The CLI's decode into it: the safetensors bytes, nothing else.
    got.clear()
    reader = _reader(fifo, got)
    reader.start()
    r = CliRunner().invoke(main, ["decode", str(DATA / "format-v2.kvc"), "-o", str(fifo)])
    reader.join(60)
    assert r.exit_code == 0, r.output
    assert got and stat.S_ISFIFO(os.stat(fifo).st_mode)
    (tmp_path / "copy.safetensors").write_bytes(got[0])
    want = kvcodec.decode(str(DATA / "format-v2.kvc"))
    back = load_safetensors(tmp_path / "copy.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values,
                                                 want.keys + want.values))


def test_a_fifo_nobody_reads_is_an_error_in_bounded_time(tmp_path, kv, monkeypatch):
    monkeypatch.setattr(paths, "FIFO_WAIT_S", 0.2)
    fifo = tmp_path / "out.kvc"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as err:  # its open waited for a reader for good
        kvcodec.encode(kv, fifo, config="lossless")
    assert err.value.errno == errno.ETIMEDOUT and "no reader came" in str(err.value)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_symlinked_output_is_written_at_its_target(tmp_path, kv):
    target = tmp_path / "real.kvc"
    target.write_bytes(b"old")
    link = tmp_path / "link.kvc"
    link.symlink_to(target)
    data = kvcodec.encode(kv, link, config="lossless")
    assert link.is_symlink() and target.read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node needs root")
def test_a_device_output_stays_a_device(tmp_path):
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    r = CliRunner().invoke(main, ["decode", str(DATA / "format-v2.kvc"), "-o", str(null)])
    assert r.exit_code == 0, r.output
    assert stat.S_ISCHR(os.stat(null).st_mode)  # it was replaced by a 216 KB file


def test_output_to_dev_stdout_is_the_file_alone(tmp_path):
    """Output through a link to the process's stdout, as /dev/stdout is (a copy of the
    link: the rename replaced the link itself, so a test of the real one, run as root
    on code without the fix, replaced /dev/stdout with a file). The status line goes to
    stderr: on stdout it was appended to the file's bytes."""
    stdout = tmp_path / "stdout"
    stdout.symlink_to("/proc/self/fd/1")
    src = str(DATA / "format-v2.kvc")
    r = subprocess.run([sys.executable, "-m", "kvcodec_cli.main", "decode", src, "-o",
                        str(stdout)], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.decode().startswith(f"wrote {stdout}: 3 layers x 70 tokens")
    assert stdout.is_symlink()
    (tmp_path / "out.safetensors").write_bytes(r.stdout)  # its metadata's order varies
    got = load_safetensors(tmp_path / "out.safetensors")
    want = kvcodec.decode(src)
    assert got.token_ids == want.token_ids and all(
        torch.equal(a, b) for a, b in zip(got.keys + got.values, want.keys + want.values))
