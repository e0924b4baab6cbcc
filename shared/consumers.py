"""Durable pull consumers, declared with the configuration the code needs.

nats-py's `pull_subscribe` keeps an existing consumer's configuration as it finds it; here
the durable is created or updated first (a new bound on deliveries reaches consumers that
older versions created), then bound to.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from shared.event_store import with_nats_retry


async def bind_durable(js: JetStreamContext, stream: str, config: ConsumerConfig) -> JetStreamContext.PullSubscription:
    durable = config.durable_name or ""

    async def declare() -> None:
        await js.add_consumer(stream, config=config)

    await with_nats_retry(declare, what=f"declare consumer {durable} on {stream}")
    return await js.pull_subscribe_bind(durable=durable, stream=stream)
