"""BENCH ONLY: the floor of "one direct get per request" — a bare ASGI app under the API's
own server (uvicorn, h11, asyncio, no access log), no framework:

- `GET /noop` answers `{"status": "ok"}` at once (the bare server's /health);
- `GET /get` answers after one nats-py direct get of SUBJECT's last message in
  SANDBOX_EVENTS, as the API's reuse does.

`python -m tests.bench.bare_asgi NATS_URL PORT SUBJECT`; `reuse_section` runs it beside the
API and reports its ratio (one direct get over no-op) as the floor of the reuse ratio.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import nats
import uvicorn
from nats.aio.client import Client

from shared.subjects import EVENTS_STREAM


def app_for(url: str, subject: str) -> Any:
    request = json.dumps({"last_by_subj": subject}).encode()
    connection: list[Client] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    connection.append(await nats.connect(url))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await connection[0].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b'{"status":"ok"}'
        if scope["path"] == "/get":
            msg = await connection[0].request(f"$JS.API.DIRECT.GET.{EVENTS_STREAM}", request, timeout=5)
            body = msg.data
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    return app


if __name__ == "__main__":
    nats_url, port, last_subject = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    uvicorn.run(app_for(nats_url, last_subject), host="127.0.0.1", port=port, log_level="warning", access_log=False)
