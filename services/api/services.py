"""What the API's handlers use, built once by the lifespan and kept in the app's state.

Handlers take it with `services_of(state)` rather than through Litestar's dependency
injection: a handler with several dependencies pays for an anyio task group per request,
which was most of what a fast reuse cost beyond GET /health.
"""

from __future__ import annotations

from dataclasses import dataclass

from litestar.datastructures import State
from nats.aio.client import Client

from services.api.gateway import CommandGateway
from services.api.idempotency import IdempotentRequests
from services.api.reuse import ReuseShortcut
from services.api.session_index import RegistryFollower
from shared.clock import Clock
from shared.event_store import EventStore


@dataclass(frozen=True, slots=True)
class ApiServices:
    nc: Client
    clock: Clock
    gateway: CommandGateway
    idempotent: IdempotentRequests
    events: EventStore
    reuse: ReuseShortcut
    sessions: RegistryFollower


def services_of(state: State) -> ApiServices:
    services: ApiServices = state.services  # set by the lifespan before the first request
    return services
