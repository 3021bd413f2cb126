"""benchmarks/throttle.py, the rate-limited relay behind bench_vllm's real 1 Gbit/s link:
it forwards every byte both ways, in order, over concurrent connections."""
import asyncio
import importlib.util
import os
from pathlib import Path

SPEC = importlib.util.spec_from_file_location(
    "throttle", Path(__file__).resolve().parents[1] / "benchmarks" / "throttle.py")
throttle = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(throttle)


def test_the_relay_forwards_every_byte_both_ways():
    async def main():
        async def echo(r, w):  # the "store": sends back what it gets, reversed
            data = await r.read(-1)
            w.write(data[::-1])
            await w.drain()
            w.close()
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        relay = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        listen = relay.sockets[0].getsockname()[1]
        relay.close()
        await relay.wait_closed()
        task = asyncio.create_task(throttle.serve(listen, "127.0.0.1", port, 50e6))
        await asyncio.sleep(0.2)

        async def one(n):
            payload = os.urandom(n)
            r, w = await asyncio.open_connection("127.0.0.1", listen)
            w.write(payload)
            await w.drain()
            w.write_eof()
            got = await r.read(-1)
            w.close()
            return got == payload[::-1]
        ok = await asyncio.gather(*(one(n) for n in (1, 70_000, 300_000)))
        task.cancel()
        server.close()
        return ok
    assert asyncio.run(main()) == [True, True, True]


def test_a_late_wakeup_is_made_up_and_an_idle_link_gives_no_credit(monkeypatch):
    """On a clock of its own, every sleep a millisecond late (the event loop's timers):
    the link still moves its bytes at its rate (every late wakeup was lost: a stream
    came at less than half the rate), and time it stood idle is no credit."""
    clock = [0.0]
    monkeypatch.setattr(throttle.time, "monotonic", lambda: clock[0])

    async def late(d):
        clock[0] += d + 0.001

    monkeypatch.setattr(throttle.asyncio, "sleep", late)
    link = throttle.Link(1e8)  # 100 MB/s: a 50 KB chunk takes 0.5 ms

    async def send(k):
        for _ in range(k):
            await link.send(50_000)
    asyncio.run(send(100))
    assert 0.050 <= clock[0] <= 0.050 + throttle.SLACK_S  # 50 ms of bytes
    clock[0] += 0.010  # idle
    start = clock[0]
    asyncio.run(send(10))
    assert clock[0] - start >= 0.005
