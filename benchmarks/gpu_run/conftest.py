"""Fixtures of a GPU run (run.sh copies this beside tests/test_cuda.py): real KV carried as
a lossless .kvc that prepare.py wrote, since the GPU machine has no model."""
import os

import kvcodec
import pytest
import torch

torch.set_num_threads(8)
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def kv_600():
    with open(os.path.join(HERE, "kv2048h.kvc"), "rb") as fh:
        return kvcodec.decode(fh.read()).slice(0, 600)


@pytest.fixture(scope="session")
def default_kvc(kv_600):
    return kvcodec.encode(kv_600, config="default")
