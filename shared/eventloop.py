"""The event loop the edge and the workers run on: uvloop where it is installed."""

from __future__ import annotations

import asyncio


def use_uvloop() -> None:
    """Make new event loops uvloop's (faster sockets); keep asyncio's where it is missing."""
    try:
        import uvloop
    except ImportError:  # uvloop is optional off Linux and macOS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
