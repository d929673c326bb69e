# Sender pacing in the SMTP data path: after each chunk read, the intake buckets of the mail's
# receivers (quotas.Throttle.buckets, shared by all senders to a receiver) say how long to wait
# before reading on. While the receivers keep up their rate is None and a bucket costs nothing.
# The only waiting done here is asyncio.sleep between reads; TCP flow control slows the client.
import asyncio
import time

from quotas import Throttle


class Pacer:
    def __init__(self, throttle: Throttle, receivers: list):
        self.buckets = throttle.buckets(receivers, time.monotonic())
        self.waited = 0.0

    async def after_read(self, nbytes: int) -> None:
        now = time.monotonic()  # a rate: a step of the wall clock must not stall or free the reader
        wait = max([bucket.take(nbytes, now) for bucket in self.buckets], default=0.0)
        if wait > 0:
            self.waited += wait
            await asyncio.sleep(wait)
