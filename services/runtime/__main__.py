"""`python -m services.runtime`: one runtime process for this Docker host."""

from __future__ import annotations

import sys

from services.runtime.service import serve
from shared.service import run_service


def main() -> int:
    return run_service("sandboxd-runtime", serve)


if __name__ == "__main__":
    sys.exit(main())
