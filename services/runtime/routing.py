"""Forwarding a command to the node that must carry it out.

Commands arrive on the public subjects `sandbox.cmd.<kind>.<chat_id>`, which name no node,
and any runtime may fetch them from the shared queue (`sandboxd-runtime`). When the command
is another node's — a create placed on another node, or a command that touches a container
another node runs — the handler raises `Forward` and the runtime republishes the command,
unchanged, on `sandbox.node.<node token>.<kind>.<chat_id>` in the same stream, then acks
the original. Each node's runtimes share that node's durable queue (`sandboxd-node-<node
token>`), so the command reaches exactly the owner's runtimes once, with no nak and no
redelivery churn. The forwarded copy's message id names the command, the hop and the node:
a redelivered original (its ack lost) is forwarded again under the same id and the stream
drops the copy; a command that must move on again (its session moved meanwhile) gets a new
hop. After MAX_HOPS the command waits instead (nak with a delay).
"""

from __future__ import annotations

import logging

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.runtime.handlers import Delivery
from shared.contracts import AnyCommand, Placement, encode
from shared.errors import Forward
from shared.event_store import with_nats_retry
from shared.subjects import MSG_ID_HEADER, NODE_COMMAND_PREFIX, node_command_subject, node_token

log = logging.getLogger(__name__)

HOPS_HEADER = "Sandbox-Hops"
PLACEMENT_HEADER = "Sandbox-Placement"
MAX_HOPS = 4

_placement_decoder = msgspec.json.Decoder(Placement)


def delivery_of(msg: Msg) -> Delivery:
    """What the forwarding runtime said with the command (nothing for a public command), and
    whether this is a client's message delivered for the first time. Only runtimes may
    publish on node subjects; a header that does not parse is ignored (a copy on a node
    subject is never taken for a first delivery)."""
    headers = msg.headers or {}
    try:
        hops = max(int(headers.get(HOPS_HEADER, "0")), 0)
    except ValueError:
        hops = 0
    placement = None
    raw = headers.get(PLACEMENT_HEADER)
    if raw:
        try:
            placement = _placement_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring a placement header that does not decode on %s", msg.subject)
    first = msg.metadata.num_delivered == 1 and hops == 0 and not msg.subject.startswith(NODE_COMMAND_PREFIX + ".")
    return Delivery(placement=placement, hops=hops, first=first)


def forwarded_headers(msg: Msg, command: AnyCommand, to: Forward, hops: int) -> dict[str, str]:
    """The original's headers (trace context among them) less NATS's own, plus the hop."""
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    headers.pop(PLACEMENT_HEADER, None)
    headers[MSG_ID_HEADER] = f"{command.command_id}:hop{hops}:{node_token(to.node_id)}"
    headers[HOPS_HEADER] = str(hops)
    if to.placement is not None:
        headers[PLACEMENT_HEADER] = encode(to.placement).decode()
    return headers


async def forward(js: JetStreamContext, msg: Msg, command: AnyCommand, to: Forward, delivery: Delivery) -> None:
    """Publish the command on its node's subject and wait for the stream to store it
    (NatsUnavailable when it did not: the original is then handed back, not acked)."""
    hops = delivery.hops + 1
    subject = node_command_subject(to.node_id, command.kind, command.chat_key)
    headers = forwarded_headers(msg, command, to, hops)
    await with_nats_retry(lambda: js.publish(subject, msg.data, headers=headers), what=f"forward to {subject}")
    log.info("command %s forwarded to node %s (hop %d)", command.command_id, to.node_id, hops)
