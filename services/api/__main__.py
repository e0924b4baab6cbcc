"""`python -m services.api`: the HTTP facade on http.host:http.port.

Every line the process writes is one JSON object (shared/logs.py), uvicorn's included: its
start-up and error lines go through the root logger, and its access lines carry the
request's fields (`method`, `path`, `status`, `client`) besides the message."""

from __future__ import annotations

import logging
import sys

import uvicorn

from services.api.app import create_app
from shared.config import ConfigError, load_settings
from shared.logs import FIELDS_ATTRIBUTE, setup_json_logging

SERVICE = "sandboxd-api"
log = logging.getLogger("services.api")


class AccessFields(logging.Filter):
    """uvicorn's access record has its parts as arguments; make them fields of the line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 5:  # noqa: PLR2004 - uvicorn's access format
            client, method, path, http_version, status = args
            fields = {"client": client, "method": method, "path": path, "http_version": http_version}
            setattr(record, FIELDS_ATTRIBUTE, {**fields, "status": status})
        return True


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        setup_json_logging(SERVICE)
        log.error("configuration error: %s", exc)  # noqa: TRY400 - the message is the whole story
        return 2
    setup_json_logging(SERVICE, settings.telemetry.log_level)
    if not settings.api.token:
        log.error("configuration error: api.token (SANDBOXD_API_TOKEN) must be set")
        return 2
    logging.getLogger("uvicorn.access").addFilter(AccessFields())
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.http.host,
        port=settings.http.port,
        log_config=None,  # the root logger's JSON handler, set up above
        log_level=settings.telemetry.log_level.lower(),
        access_log=True,
        # Open streams (the dashboard's live feed) must not hold a stop for long.
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
