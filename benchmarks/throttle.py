"""A rate-limited TCP relay on loopback: what a slow link does to the bytes of a store,
without ``tc`` (no root, no kernel queueing discipline). Every connection shares one
schedule per direction, as the connections of one link share its bandwidth; latency is
loopback's.

    python benchmarks/throttle.py --listen 9001 --to 127.0.0.1:9000 --gbps 1

``bench_vllm.py``'s ``kvcodec-default-1g`` case puts it between vLLM's connector and an
S3 server (moto) on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import asyncio
import time

CHUNK = 64 << 10


# How far behind its schedule the link may fall and catch up (a wakeup that came late:
# the event loop's timers have a millisecond's resolution); past that it was idle, and
# starts afresh. Without it every late wakeup was lost: a 50 MB object came at 0.42
# Gbit/s through a 1 Gbit/s link, a 650 KB one at 0.36, eight of those at once at 0.84
# (HTTP on 127.0.0.1, 2-core Zen 3). With 2 ms: 0.94, 1.05 (its first chunks on the
# previous transfer's late schedule: 2 ms of credit at most) and 0.89; with 1 ms: 0.70,
# 0.62 and 0.86.
SLACK_S = 0.002


class Link:
    """One direction of the link: each chunk leaves when the previous ones have, at
    ``rate`` bytes per second; a late wakeup is made up by the next chunks (at most
    ``SLACK_S`` of it), an idle link gives no credit."""

    def __init__(self, rate: float):
        self.rate = rate
        self.free_at = time.monotonic()

    async def send(self, n: int) -> None:
        now = time.monotonic()
        if self.free_at < now - SLACK_S:  # idle: the link starts sending now
            self.free_at = now
        self.free_at += n / self.rate
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


async def _pipe(reader, writer, link: Link) -> None:
    """Bytes from ``reader`` to ``writer`` at the link's rate; the end of the stream is
    passed on as a half-close, so the other direction keeps flowing."""
    try:
        while data := await reader.read(CHUNK):
            await link.send(len(data))
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, asyncio.IncompleteReadError):
        writer.close()


async def serve(listen: int, host: str, port: int, rate: float) -> None:
    up, down = Link(rate), Link(rate)

    async def handle(client_r, client_w):
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w, up), _pipe(server_r, client_w, down))
        client_w.close()
        server_w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--to", required=True, help="HOST:PORT")
    ap.add_argument("--gbps", type=float, default=1.0)
    args = ap.parse_args()
    host, port = args.to.rsplit(":", 1)
    asyncio.run(serve(args.listen, host, int(port), args.gbps * 1e9 / 8))


if __name__ == "__main__":
    main()
