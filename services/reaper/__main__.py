"""`python -m services.reaper`: publishes stops for expired and stuck sandboxes."""

from __future__ import annotations

import sys

from services.reaper.service import serve
from shared.service import run_service


def main() -> int:
    return run_service("sandboxd-reaper", serve)


if __name__ == "__main__":
    sys.exit(main())
