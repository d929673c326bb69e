# `mailhub serve`: run the hub (mailhub/hub.py) until SIGTERM or SIGINT, then shut it down
# gracefully (stop listening, let transactions in flight finish within shutdown_timeout, never
# acknowledge a partial message).
from .config import Config
from .hub import Hub


async def serve(cfg: Config) -> None:
    async with Hub(cfg, handle_signals=True) as hub:
        await hub.stopped()
