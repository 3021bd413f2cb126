"""The connector's threads beside vLLM's model (:mod:`kvcodec.integrations.vllm.cpu`):
torch single-threaded in them, and whether loads overlap the forward pass. The engine's
side of both is in test_vllm.py."""
import threading

import pytest
import torch

from kvcodec.integrations.vllm.cpu import overlap_loads, torch_one_thread


def _in_thread(fn):
    got = []
    t = threading.Thread(target=lambda: got.append(fn()))
    t.start()
    t.join()
    return got[0]


@pytest.fixture
def two_threads():
    """torch on 2 threads in this process (restored after), so "one" is a change."""
    before = torch.get_num_threads()
    torch._C.set_num_threads(2)  # torch.set_num_threads is a no-op once vLLM ran here
    yield 2
    torch._C.set_num_threads(before)


def _one_then_count():
    torch_one_thread()
    torch.ones(1 << 16).mul_(2)  # a parallel op on more threads than one, unless changed
    return torch.get_num_threads()


def test_a_thread_of_ours_runs_torch_on_one_thread_and_no_other_changes(two_threads):
    assert _in_thread(_one_then_count) == 1
    assert torch.get_num_threads() == two_threads  # the calling thread's, untouched
    # Threads started later begin with the process's count, not with one.
    assert _in_thread(torch.get_num_threads) == two_threads


def test_it_gets_past_vllms_guard(two_threads, monkeypatch):
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op after binding its
    threads; torch's own is what changes the count."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    assert _in_thread(_one_then_count) == 1
    assert _in_thread(torch.get_num_threads) == two_threads


@pytest.mark.parametrize("setting, want", [(True, True), (False, False), ("true", True),
                                           ("false", False), ("0", False), ("yes", True)])
def test_overlap_as_set(setting, want):
    assert overlap_loads(setting, "cpu") is want


def test_overlap_on_auto(monkeypatch, two_threads):
    # A GPU's forward pass leaves the CPU to the decoder.
    assert overlap_loads("auto", torch.device("cuda", 0)) is True
    assert overlap_loads(None, "cuda") is True
    # On the CPU: only where the model leaves cores over.
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert overlap_loads("auto", torch.device("cpu")) is False
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    assert overlap_loads("auto", "cpu") is True
