"""What a command message says of how it reached the runtime."""

from __future__ import annotations

from nats.aio.msg import Msg

from services.runtime.routing import HOPS_HEADER, delivery_of

_CHAT = "6f1c1f0e-2b8a-4d55-9c1e-3f7a2f9d8c11"


def _msg(subject: str, delivered: int, headers: dict[str, str] | None = None) -> Msg:
    reply = f"$JS.ACK.SANDBOX_COMMANDS.sandboxd-runtime.{delivered}.7.7.1700000000000000000.0"
    return Msg(_client=None, subject=subject, reply=reply, data=b"{}", headers=headers)  # type: ignore[arg-type]


def test_only_a_clients_message_delivered_once_is_a_first_delivery() -> None:
    public = f"sandbox.cmd.stop.{_CHAT}"
    assert delivery_of(_msg(public, 1)).first
    assert not delivery_of(_msg(public, 2)).first  # redelivered: a handling may have been under way
    assert not delivery_of(_msg(public, 1, {HOPS_HEADER: "1"})).first
    assert not delivery_of(_msg(f"sandbox.node.n1.stop.{_CHAT}", 1)).first  # a runtime's forwarded copy
