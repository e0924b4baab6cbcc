# sandboxd — `just up` runs the stack, `just test` runs every check.
set shell := ["bash", "-euo", "pipefail", "-c"]
export UV_PYTHON_DOWNLOADS := "never"

# Run the whole stack: embedded nats-server, runtime, API on 127.0.0.1:8123.
up: bootstrap
    uv run sandboxctl up

# ruff, mypy (strict) and the whole pytest suite (unit + real NATS + real Docker), with a
# branch-coverage report of shared/ and services/ (no threshold).
test: bootstrap
    uv run ruff check .
    uv run ruff format --check .
    uv run mypy
    uv run pytest --cov --cov-report=term-missing:skip-covered

# Only the fast tests: everything outside tests/integration (no NATS, no Docker, no ruff/mypy).
unit:
    uv sync --frozen --quiet
    uv run pytest -m "not integration"

# Install what the commands need: the locked Python environment, a static busybox (the
# default sandbox image is built from it; no registry is needed), chromium with its driver
# (the dashboard's browser test) and gVisor's runsc, registered with the Docker engine
# (reloaded, never restarted; NO_GVISOR=1 skips it).
bootstrap:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v uv >/dev/null || python3 -m pip install --quiet uv
    uv sync --frozen --quiet
    if ! uv run python -c 'from services.runtime.image import find_static_busybox as f; f()' 2>/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing busybox-static for the sandbox image"
            apt-get install -y -qq busybox-static >/dev/null || (apt-get update -qq && apt-get install -y -qq busybox-static >/dev/null)
        else
            echo "warning: no static busybox; install busybox-static to build the sandbox image" >&2
        fi
    fi
    # The dashboard's browser test (tests/integration/test_dashboard.py) drives Debian's chromium.
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing chromium and chromium-driver for the dashboard's browser test"
            apt-get install -y -qq chromium chromium-driver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)
        else
            echo "warning: no chromium/chromedriver; install chromium and chromium-driver for the browser test" >&2
        fi
    fi
    infra/gvisor/register-runsc

# Regenerate schemas/ after changing shared/contracts.py.
schemas:
    uv run sandboxctl schemas

# Regenerate infra/nats/ (nats-server configs with the roles) after changing shared/nats_roles.py.
nats-infra:
    uv run sandboxctl nats-infra

# Build (or rebuild) the default sandbox image.
image:
    uv run sandboxctl build-image

# Benchmarks against the floors on this machine (a few minutes); prints a table, writes JSON
# to bench-results/. Needs what `just test` needs (a Docker engine).
bench: bootstrap
    uv run python -m tests.bench.harness
