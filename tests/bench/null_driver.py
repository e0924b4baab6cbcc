"""BENCH ONLY: a container driver that does no Docker work, so the control plane's own cost
(NATS, event sourcing, our code) can be measured. It is not importable from the product
packages and no setting selects it: only `tests/bench/runtime_main.py` wires it."""

from __future__ import annotations

from services.runtime.containers import ContainerIdentity, ContainerSpec
from services.runtime.docker_driver import ObservedContainer


class BenchNullDriver:
    """Pretends every container starts and stops instantly."""

    def __init__(self) -> None:
        self.running: set[str] = set()

    async def ensure_running(self, spec: ContainerSpec) -> str:
        self.running.add(spec.name)
        return f"bench-{spec.name}"

    async def remove(
        self,
        identity: ContainerIdentity,
        stop_timeout_seconds: int,  # noqa: ARG002 - the protocol
        ref: str | None = None,  # noqa: ARG002 - the protocol
    ) -> None:
        self.running.discard(identity.name)

    async def list_managed(self, node_id: str) -> list[ObservedContainer]:  # noqa: ARG002 - the protocol
        return []

    async def pause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        """Nothing to freeze."""

    async def unpause(self, identity: ContainerIdentity, ref: str | None = None) -> None:
        """Nothing to thaw."""
