"""What the API's pub/sub hub (`moonq.stream.EventHub`) costs a relayed event: CPU per
message of one process whose hub fans `--messages` messages on each of `--channels` channels
out to a listener each, published in bursts (one pipeline a round, every channel once) as a
worker's writes publish them. The publisher runs in the same process, so compare releases
side by side (`PYTHONPATH=<checkout> python -m bench.hub`), not the figure alone.

`--lone`: the messages come one at a time instead, each in a socket read of its own (as a
paced stream's chunks reach the API), from a publisher in another process; the figure is then
the hub's process alone.

    python -m bench.hub [--channels 200] [--messages 100] [--lone] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from moonq.redis import connect
from moonq.stream import EventHub

EVENT = b'{"seq":1,"event":"chunk","attempt":1,"data":' + b"x" * 300 + b"}"


# The --lone publisher: one PUBLISH at a time, every channel in turn, 0.2 ms apart.
_LONE = """
import sys, time, redis
client, event, names = redis.Redis.from_url(sys.argv[1]), sys.argv[3], sys.argv[4:]
for _ in range(int(sys.argv[2])):
    for name in names:
        client.publish(name, event)
        time.sleep(0.0002)
"""


async def measure(url: str, channels: int, messages: int, lone: bool = False) -> float:
    """CPU µs per message delivered to its listener."""
    redis, publisher = connect(url), connect(url)
    hub = EventHub(redis, queue_size=messages + 16)
    names = [f"bench-hub:{uuid.uuid4().hex}" for _ in range(channels)]

    async def listener(name: str, ready: asyncio.Event) -> None:
        async with hub.listen(name) as queue:
            ready.set()
            for _ in range(messages):
                await queue.get()

    readies = [asyncio.Event() for _ in names]
    tasks = [asyncio.create_task(listener(n, r)) for n, r in zip(names, readies, strict=True)]
    try:
        for ready in readies:
            await ready.wait()
        cpu = time.process_time()
        if lone:
            args = [url, str(messages), EVENT.decode(), *names]
            sender = await asyncio.create_subprocess_exec(sys.executable, "-c", _LONE, *args)
            await asyncio.gather(*tasks)
            await sender.wait()
        else:
            for _ in range(messages):
                async with publisher.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.publish(name, EVENT)
                    await pipe.execute()
                await asyncio.sleep(0.002)  # a worker writes at most every 2 ms
            await asyncio.gather(*tasks)
        return (time.process_time() - cpu) / (channels * messages) * 1e6
    finally:
        await hub.close()
        await redis.aclose()
        await publisher.aclose()


def main() -> None:
    cli = argparse.ArgumentParser(prog="python -m bench.hub", description=__doc__)
    cli.add_argument("--channels", type=int, default=200)
    cli.add_argument("--messages", type=int, default=100)
    cli.add_argument("--repeat", type=int, default=3)
    cli.add_argument("--lone", action="store_true", help="one message to a socket read")
    cli.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    args = cli.parse_args()
    runs = [
        asyncio.run(measure(args.redis_url, args.channels, args.messages, args.lone))
        for _ in range(args.repeat)
    ]
    shown = ", ".join(f"{r:.1f}" for r in runs)
    whose = "the hub's process" if args.lone else "publisher included"
    print(f"CPU per relayed message ({whose}): {sorted(runs)[len(runs) // 2]:.1f} µs")
    print(f"(runs: {shown} µs; {args.channels} channels × {args.messages} messages each)")


if __name__ == "__main__":
    main()
