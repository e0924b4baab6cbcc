"""`python -m services.api`: the HTTP facade on http.host:http.port."""

from __future__ import annotations

import sys

import uvicorn

from services.api.app import create_app
from shared.config import ConfigError, load_settings
from shared.service import setup_logging


def main() -> int:
    setup_logging()
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"sandboxd-api: configuration error: {exc}", file=sys.stderr)
        return 2
    if not settings.api.token:
        print("sandboxd-api: configuration error: api.token (SANDBOXD_API_TOKEN) must be set", file=sys.stderr)
        return 2
    app = create_app(settings)
    uvicorn.run(app, host=settings.http.host, port=settings.http.port, log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
