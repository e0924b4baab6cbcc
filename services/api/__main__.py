"""`python -m services.api`: the HTTP facade on http.host:http.port."""

from __future__ import annotations

import sys

import uvicorn

from services.api.app import create_app
from shared.config import ConfigError, load_settings
from shared.logs import setup_json_logging


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"sandboxd-api: configuration error: {exc}", file=sys.stderr)
        return 2
    if not settings.api.token:
        print("sandboxd-api: configuration error: api.token (SANDBOXD_API_TOKEN) must be set", file=sys.stderr)
        return 2
    setup_json_logging("sandboxd-api", settings.telemetry.log_level)
    app = create_app(settings)
    uvicorn.run(
        app, host=settings.http.host, port=settings.http.port, log_config=None, log_level="info", access_log=False
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
