# `mailhub serve`: run the hub (mailhub/hub.py) until SIGTERM or SIGINT, then shut it down
# gracefully (stop listening, let transactions in flight finish within shutdown_timeout, never
# acknowledge a partial message); after SIGUSR2 or `mailhub restart` the same, with the listening
# sockets kept for the hub that takes over.
import socket

from .config import Config
from .hub import Hub


async def serve(cfg: Config, inherited: dict[str, list[socket.socket]] | None = None) -> list[tuple[str, int]]:
    """Run until stopped; returns the listening sockets kept for a graceful restart (SIGUSR2,
    `mailhub restart`: the caller starts the new hub with them, mailhub/handover.py), else []."""
    hub = Hub(cfg, handle_signals=True, inherited=inherited)
    async with hub:
        await hub.stopped()
    return hub.kept
