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
