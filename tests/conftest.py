"""Session-scoped real model and real KV, shared by every test."""
import sysconfig
from pathlib import Path

import pytest
import torch

import kvcodec

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
def kv_600(lm, texts):
    """600 tokens of real KV: two full 256-token chunks and a partial one."""
    return kvcodec.capture_kv(lm, texts["python_license"], max_tokens=600)


@pytest.fixture(scope="session")
def kv_1536(lm, texts):
    return kvcodec.capture_kv(lm, texts["gpl3"], max_tokens=1536)


@pytest.fixture(scope="session")
def default_kvc(kv_600):
    return kvcodec.encode(kv_600, config="default")
