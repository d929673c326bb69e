# Sender pacing in the SMTP data path: after each chunk read, a token bucket (quotas.pacing) says how
# long to wait before reading on, at the rate the throttle allows for the mail's receivers (asked
# again once a second). While the receivers keep up the rate is None and the bucket costs nothing.
# The only waiting done here is asyncio.sleep between reads; TCP flow control slows the client.
import asyncio
import time

from quotas import Throttle, TokenBucket

_ASK_EVERY = 1.0


class Pacer:
    def __init__(self, throttle: Throttle, receivers: list):
        now = time.time()
        self.throttle = throttle
        self.receivers = receivers
        self.bucket = TokenBucket(throttle.pacing_rate(receivers, now), now, throttle.settings.pacing)
        self.asked_at = now
        self.waited = 0.0

    async def after_read(self, nbytes: int) -> None:
        now = time.time()
        if now - self.asked_at >= _ASK_EVERY:
            self.asked_at = now
            self.bucket.set_rate(self.throttle.pacing_rate(self.receivers, now), now)
        wait = self.bucket.take(nbytes, now)
        if wait > 0:
            self.waited += wait
            await asyncio.sleep(wait)
