"""The one error tree; nats-py and docker-py exceptions are wrapped into it at the adapters."""

from __future__ import annotations

from shared.contracts import ErrorType, Placement


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
    """The session's container lives on another Docker host whose runtimes are silent (not
    yet dead): only that node may touch it, so the command waits (nak with a delay) for the
    node to answer again or to be declared dead."""

    def __init__(self, owner: str, here: str) -> None:
        super().__init__(f"the container belongs to node {owner}, this is {here}")
        self.owner = owner


class Forward(SandboxdError):
    """The command is for another node: the one whose container it touches, or the one a new
    session was placed on. The consumer forwards it to that node's queue and acknowledges it."""

    def __init__(self, node_id: str, placement: Placement | None = None) -> None:
        super().__init__(f"for node {node_id}")
        self.node_id = node_id
        self.placement = placement


class SandboxStartFailed(InfrastructureError):
    """The container could not be created or started."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorType.SANDBOX_START_FAILED, message)


class SandboxStopFailed(InfrastructureError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorType.SANDBOX_STOP_FAILED, message)


class SandboxPauseFailed(InfrastructureError):
    """The container could not be paused or unpaused (gone, or Docker refused)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorType.SANDBOX_PAUSE_FAILED, message)
