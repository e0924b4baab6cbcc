"""`with_nats_retry`: a request that NATS could not answer (a reconnect, a stream leader being
elected in a cluster) is retried, then reported as NatsUnavailable (HTTP 503), never as an
unexpected error."""

from __future__ import annotations

import pytest
from nats.errors import NoRespondersError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from shared.errors import NatsUnavailable
from shared.event_store import with_nats_retry


@pytest.mark.parametrize("error", [NoStreamResponseError, NoRespondersError, ServiceUnavailableError])
async def test_no_answer_is_retried_then_unavailable(error: type[Exception]) -> None:
    calls = 0

    async def publish() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(NatsUnavailable):
        await with_nats_retry(publish, attempts=2)
    assert calls == 2


async def test_a_stream_leader_elected_meanwhile_answers_the_retry() -> None:
    answers: list[Exception | str] = [NoStreamResponseError(), "ack"]

    async def publish() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await with_nats_retry(publish) == "ack"
