"""The one error tree; nats-py and docker-py exceptions are wrapped into it at the adapters."""

from __future__ import annotations

from shared.contracts import ErrorType


class SandboxdError(Exception):
    """Root of every error sandboxd raises on purpose."""


class TransientError(SandboxdError):
    """Worth retrying: a dependency is briefly unreachable or busy."""


class NatsUnavailable(TransientError):
    """NATS (or the stream's leader) did not answer."""


class AppendConflict(SandboxdError):
    """Another writer appended to the chat's subject first: re-read and decide again."""


class InfrastructureError(SandboxdError):
    """A dependency answered with a definite failure."""

    def __init__(self, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class DockerUnavailable(TransientError):
    """The Docker engine could not be reached."""


class WrongNode(TransientError):
    """The session's container lives on another Docker host: only that node's runtime may
    touch it, so the command goes back to the stream for another runtime to take."""

    def __init__(self, owner: str, here: str) -> None:
        super().__init__(f"the container belongs to node {owner}, this is {here}")
        self.owner = owner


class SandboxStartFailed(InfrastructureError):
    """The container could not be created or started."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorType.SANDBOX_START_FAILED, message)


class SandboxStopFailed(InfrastructureError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorType.SANDBOX_STOP_FAILED, message)
