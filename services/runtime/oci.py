"""Which OCI runtime the sandboxes run under (`sandbox.oci_runtime`), and whether the warm
pool can work under it.

`auto` (the default) picks gVisor (`runsc`) when the engine lists it and runc otherwise; an
explicit name the engine does not list stops start-up. Pure: the engine's runtime list
(`docker info`'s `Runtimes` and `DefaultRuntime`) comes in as data.

The warm pool attaches a chat's directory to a running container by a host bind mount made
inside the container's slot, which propagates to it (slots.py). Runtimes whose containers
are host processes in host mount namespaces (runc, crun, youki) see that, and so does gVisor
(runsc): its gofer finds the mount when the sandbox looks the name up (measured; a mount
over the slot itself it would not see, which is why the claim mounts inside it). Under any
other runtime the pool is off and every create is cold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from shared.config import ConfigError

AUTO = "auto"
GVISOR = "runsc"
RUNC = "runc"
# Runtimes under which a mount made on the host inside a running container's rslave bind is
# seen by the container (what the warm pool needs): those whose containers live in host mount
# namespaces, and gVisor (its gofer looks names up on the host).
_POOL_RUNTIMES = frozenset({"runc", "crun", "youki", GVISOR})
SETTING = "sandbox.oci_runtime (SANDBOXD_SANDBOX_OCI_RUNTIME)"


class RuntimeUnavailable(ConfigError):
    """The configured runtime is not one the engine lists; the message names the key (a
    configuration error: the process exits 2 and `sandboxctl up` stops the stack)."""


@dataclass(frozen=True, slots=True)
class RuntimeChoice:
    # What containers are created with; None: the engine's default (no engine was asked).
    name: str | None
    why: str
    binary: str | None = None  # the runtime's program, as the engine lists it
    warm_pool_blocker: str | None = None  # why the warm pool cannot work under it; None: it can

    @property
    def is_gvisor(self) -> bool:
        return self.name == GVISOR or _program(self.binary) == GVISOR


def _program(path: str | None) -> str | None:
    return PurePath(path).name if path else None


def choose_runtime(configured: str, info: Mapping[str, Any] | None) -> RuntimeChoice:
    """The runtime for `configured` given the engine's `docker info` (None: no engine to ask,
    e.g. a test's fake driver: `auto` then leaves the choice to the engine)."""
    if info is None:
        if configured == AUTO:
            return RuntimeChoice(None, "no container engine to ask; the engine's default runtime")
        return RuntimeChoice(configured, f"{SETTING} = {configured!r}")
    runtimes: Mapping[str, Any] = info.get("Runtimes") or {}
    default = str(info.get("DefaultRuntime") or RUNC)
    if configured == AUTO:
        if GVISOR in runtimes:
            name, why = GVISOR, f"{SETTING} = 'auto' and the engine lists {GVISOR} (gVisor)"
        else:
            name = RUNC if RUNC in runtimes or not runtimes else default
            listed = ", ".join(sorted(runtimes)) or "none"
            why = f"{SETTING} = 'auto' and the engine lists no {GVISOR} (gVisor) runtime (it lists: {listed})"
    elif configured in runtimes:
        name, why = configured, f"{SETTING} = {configured!r}"
    else:
        listed = ", ".join(sorted(runtimes)) or "none"
        raise RuntimeUnavailable(
            f"{SETTING} is {configured!r}, but the Docker engine has no such runtime (it lists: {listed}); "
            f"register it in /etc/docker/daemon.json (see the README's gVisor section) or set 'auto'"
        )
    entry = runtimes.get(name)
    binary = str(entry.get("path")) if isinstance(entry, Mapping) and entry.get("path") else None
    return RuntimeChoice(name, why, binary, warm_pool_blocker(name, binary))


def warm_pool_blocker(name: str, binary: str | None) -> str | None:
    """Why a warm container could not get its chat under this runtime; None: it can."""
    program = _program(binary) or name
    if program in _POOL_RUNTIMES or name in _POOL_RUNTIMES:
        return None
    return (
        f"runtime {name} ({binary or 'unknown program'}) is not known to see a mount made on the host after its "
        f"container started (only {', '.join(sorted(_POOL_RUNTIMES))} are)"
    )
