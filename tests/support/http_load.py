"""A steady stream of HTTP requests against an API process, every answer recorded: each
worker owns one chat and alternates a create (a reuse once the chat has its sandbox) and a
keepalive, with no pause between requests, so some are always in flight. Used to put a
fault under load (a nats-server killed and restarted) and judge every answer afterwards."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True, slots=True)
class Call:
    kind: str  # create | keepalive
    chat: str
    started: float  # wall clock (time.time()), comparable with the processes' log lines
    ended: float
    status: int | None  # None: no HTTP answer at all
    body: str

    def spans(self, moment: float) -> bool:
        return self.started < moment < self.ended


@dataclass
class HttpLoad:
    base: str
    token: str
    chats: list[str]
    # A client time-out far beyond the API's own wait: an answer that never comes is a
    # finding, not something to wait for forever.
    timeout: float = 120.0
    calls: list[Call] = field(default_factory=list)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(chat)) for chat in self.chats]

    async def stop(self) -> None:
        """Let every request in flight finish, send no more."""
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def answered(self, statuses: tuple[int, ...] = (200, 201), *, since: float = 0.0) -> list[Call]:
        """Calls sent after `since` and answered with one of `statuses`."""
        return [c for c in self.calls if c.status in statuses and c.started > since]

    async def _worker(self, chat: str) -> None:
        headers = {"X-API-Token": self.token}
        async with httpx.AsyncClient(base_url=self.base, headers=headers, timeout=self.timeout) as http:
            kinds = ("create", "keepalive")
            i = 0
            while not self._stopping.is_set():
                kind = kinds[i % 2]
                i += 1
                started = time.time()
                try:
                    if kind == "create":
                        response = await http.post("/api/v1/sandboxes", json={"chat_id": chat})
                    else:
                        response = await http.post(f"/api/v1/sandboxes/{chat}/keepalive", json={})
                except httpx.HTTPError as exc:
                    self.calls.append(Call(kind, chat, started, time.time(), None, repr(exc)))
                    continue
                self.calls.append(Call(kind, chat, started, time.time(), response.status_code, response.text))
                if response.status_code == 503:
                    await asyncio.sleep(0.05)
