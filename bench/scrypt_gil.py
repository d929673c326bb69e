#!/usr/bin/env python3
# Does hashlib.scrypt release the GIL, and what does a password-check flood cost the event loop?
# The hub checks site passwords (scrypt, storage/passwords.py) in a small thread pool at nice 10
# (storage/site_cache.py). This measures, in alternating rounds of --seconds each:
#   - hashes/s with 1 and with 2 hashing threads (more with 2 only if the GIL is released and a
#     second core is free);
#   - an asyncio loop's lag (a callback due every 10 ms: how late it runs, p50/p99/max) while 0, 1
#     or 2 threads hash without a pause, at normal priority and at nice 10 (as the hub runs them).
# A loop lag of a few ms with threads hashing means the GIL is released; ~one hash time (60-100 ms)
# would mean it is not (then only a process pool would keep the loop responsive).
# Usage: python bench/scrypt_gil.py [--seconds 10] [--rounds 2]
import asyncio
import hashlib
import os
import statistics
import threading
import time

from bench.common import argument_parser, command_line

N, R, P = 2**14, 8, 1  # storage/passwords.py


def one_hash() -> None:
    hashlib.scrypt(b"password", salt=b"0123456789abcdef", n=N, r=R, p=P, dklen=32)


def hash_rate(threads: int, seconds: float) -> float:
    counts = [0] * threads
    end = time.monotonic() + seconds

    def work(i):
        while time.monotonic() < end:
            one_hash()
            counts[i] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(counts) / seconds


def loop_lag(threads: int, nice: int, seconds: float) -> tuple[float, float, float, float]:
    """(p50, p99, max lag in ms, hashes/s) of a loop ticking every 10 ms beside `threads` hashers."""
    stop = threading.Event()
    hashes = [0]

    def work():
        if nice:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        while not stop.is_set():
            one_hash()
            hashes[0] += 1

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()

    async def ticks():
        loop = asyncio.get_running_loop()
        lags = []
        end = loop.time() + seconds
        while loop.time() < end:
            due = loop.time() + 0.01
            await asyncio.sleep(0.01)
            lags.append(max(0.0, loop.time() - due) * 1000)
        return lags

    lags = asyncio.run(ticks())
    stop.set()
    for t in pool:
        t.join()
    lags.sort()
    return (statistics.median(lags), lags[int(len(lags) * 0.99) - 1], lags[-1], hashes[0] / seconds)


def main() -> None:
    ap = argument_parser(
        "bench.scrypt_gil",
        "Does hashlib.scrypt release the GIL, and what does a password-check flood cost\n"
        "the event loop? Hash rates and loop lag by hashing threads and nice level.",
    )
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per figure (default 10)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    args = ap.parse_args()
    print(command_line("bench.scrypt_gil"), flush=True)
    started = time.monotonic()
    one_hash()
    print(f"one scrypt (N={N}, r={R}, p={P}): {(time.monotonic() - started) * 1000:.0f} ms; cpus: {os.cpu_count()}")
    rates: dict[int, list[float]] = {1: [], 2: []}
    lags: dict[tuple[int, int], list[tuple[float, float, float, float]]] = {}
    for _ in range(args.rounds):
        for threads in (1, 2):
            rates[threads].append(hash_rate(threads, args.seconds))
        for threads, nice in ((0, 0), (1, 0), (2, 0), (2, 10)):
            lags.setdefault((threads, nice), []).append(loop_lag(threads, nice, args.seconds))
    print("\nhashes/s by hashing threads (median of rounds):")
    for threads, values in rates.items():
        print(
            f"  {threads} thread(s): {statistics.median(values):6.1f}   rounds: {', '.join(f'{v:.1f}' for v in values)}"
        )
    print(f"  ratio 2/1: {statistics.median(rates[2]) / statistics.median(rates[1]):.2f}")
    print("\nevent-loop lag (ms) of a 10 ms tick beside hashing threads (median of rounds):")
    print(f"  {'threads':>7} {'nice':>4} {'p50':>7} {'p99':>7} {'max':>7} {'hashes/s':>9}")
    for (threads, nice), runs in lags.items():
        p50, p99, worst, rate = (statistics.median(run[i] for run in runs) for i in range(4))
        print(f"  {threads:>7} {nice:>4} {p50:7.2f} {p99:7.2f} {worst:7.2f} {rate:9.1f}")


if __name__ == "__main__":
    main()
