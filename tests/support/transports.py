"""A stand-in for a connection's transport, for protocol tests that need no socket."""

from __future__ import annotations

import asyncio
from typing import Any

from edgeproxy.heldhead import Data


class Recorder(asyncio.Transport):
    """A connection that records each send: a write or a writelines is one writev."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[bytes] = []
        self.closed = False
        self.reading = True  # uvicorn pauses reading while a body it holds waits for the app

    def write(self, data: Data) -> None:
        self.sends.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.sends.append(b"".join(list_of_data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 5000)}.get(
            name, default
        )
