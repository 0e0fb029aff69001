#!/usr/bin/env python3
"""A burst of same-key clients against `idem serve` in `concurrent = "wait"`
mode, in front of an upstream that answers after a fixed delay.

Starts the upstream itself (asyncio, on --upstream-port, counting the calls
it gets), then opens --clients connections to the gateway, sends the same
POST with the same Idempotency-Key on all of them at once, and reports:
executions (calls the upstream got), errors (anything but 201), and the
latency of the answers (p50, p99, max) next to the upstream's delay.

  python3 benches/load/waiters.py --gateway 127.0.0.1:8096 --clients 500
(the gateway's upstream must be http://127.0.0.1:<upstream-port>, its
route `concurrent = "wait"`; see benches/load/waiters.sh).
"""
import argparse
import asyncio
import time
import uuid

calls = 0


async def upstream(reader, writer, delay):
    global calls
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            calls += 1
            await asyncio.sleep(delay)
            body = b'{"order":"created"}'
            writer.write(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def client(host, port, key, start, results):
    reader, writer = await asyncio.open_connection(host, port)
    body = b'{"sku":"tea","qty":1}'
    req = (b"POST /orders HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
           b"idempotency-key: %s\r\ncontent-length: %d\r\n\r\n%s" % (key.encode(), len(body), body))
    await start.wait()
    t0 = time.perf_counter()
    writer.write(req)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    t1 = time.perf_counter()
    status = int(head.split(b" ")[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if length:
        await reader.readexactly(length)
    writer.close()
    results.append((status, t1 - t0, b"idempotent-replayed: true" in head.lower()))


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gateway", default="127.0.0.1:8096")
    p.add_argument("--upstream-port", type=int, default=3300)
    p.add_argument("--delay", type=float, default=0.2)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    global calls
    server = await asyncio.start_server(lambda r, w: upstream(r, w, a.delay), "127.0.0.1",
                                        a.upstream_port, backlog=4096)
    host, port = a.gateway.split(":")
    print(f"# {a.clients} clients, one key per round, upstream delay {a.delay * 1000:.0f} ms")
    print("# round executions errors replayed p50_ms p99_ms max_ms p99_minus_upstream_ms")
    for r in range(1, a.rounds + 1):
        calls = 0
        key = f"burst-{uuid.uuid4()}"
        start = asyncio.Event()
        results = []
        tasks = [asyncio.create_task(client(host, int(port), key, start, results))
                 for _ in range(a.clients)]
        await asyncio.sleep(1.0)  # every connection open before the burst
        start.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        failed = sum(1 for d in done if isinstance(d, Exception))
        lat = sorted(t for _, t, _ in results)
        errors = failed + sum(1 for s, _, _ in results if s != 201)
        replayed = sum(1 for _, _, rep in results if rep)
        q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] * 1000 if lat else float("nan")
        print(f"{r} {calls} {errors} {replayed} {q(0.5):.1f} {q(0.99):.1f} {q(1.0):.1f} "
              f"{q(0.99) - a.delay * 1000:.1f}", flush=True)
    server.close()


asyncio.run(main())
