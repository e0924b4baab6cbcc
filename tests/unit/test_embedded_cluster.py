"""The servers `sandboxctl up` runs: one, or a loopback cluster rendered by the same
renderer as infra/nats/ (each with its name, ports, store, log and the roles' accounts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, ServiceUnavailableError

from services.ctl.stack import (
    DATA_DIR,
    NATS_DIR,
    StackError,
    banner,
    embedded_servers,
    run_up,
    wait_while_forming,
)
from services.ctl.supervisor import CONFIG_ERROR_EXIT
from shared.config import NatsSettings, load_settings
from shared.nats_server_config import ACCOUNTS_FILE, render_server


def test_a_single_server_by_default() -> None:
    (server,) = embedded_servers(NatsSettings())
    assert (server.child, server.port, server.store_dir, server.cluster) == ("nats-server", 4222, NATS_DIR, None)
    assert server.ports == (4222,)


def test_a_cluster_of_three_on_consecutive_loopback_ports() -> None:
    servers = embedded_servers(NatsSettings(embedded_cluster_size=3, embedded_port=5000, embedded_cluster_port=7000))
    assert [s.child for s in servers] == ["nats-server-n1", "nats-server-n2", "nats-server-n3"]
    assert [s.server_name for s in servers] == ["sandboxd-n1", "sandboxd-n2", "sandboxd-n3"]
    assert [s.ports for s in servers] == [(5000, 7000), (5001, 7001), (5002, 7002)]
    assert [s.store_dir for s in servers] == [NATS_DIR / f"sandboxd-n{i}" for i in (1, 2, 3)]
    assert [s.log for s in servers] == [DATA_DIR / f"nats-server-n{i}.log" for i in (1, 2, 3)]
    assert len({s.config for s in servers}) == 3
    assert all(s.config.parent == NATS_DIR for s in servers), "beside accounts.conf, which they include"

    first = servers[0]
    assert first.cluster is not None
    config = render_server(
        server_name=first.server_name, port=first.port, store_dir=str(Path("x")), cluster=first.cluster
    )
    assert 'listen: "127.0.0.1:7000"' in config
    assert '"nats-route://127.0.0.1:7001"' in config
    assert '"nats-route://127.0.0.1:7002"' in config
    assert "nats-route://127.0.0.1:7000" not in config, "no route to itself"
    assert f'include "{ACCOUNTS_FILE}"' in config


def test_the_banner_names_every_server_of_a_cluster() -> None:
    urls = "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
    text = banner("http://x", "t", "X-API-Token", generated=True, nats=urls, agent_seed=Path("a.nk"), replicas=3)
    assert "3-server cluster (127.0.0.1:4222, 127.0.0.1:4223, 127.0.0.1:4224)" in text
    assert "3 replicas" in text
    assert f"nats -s {urls} --nkey a.nk" in text
    single = banner("http://x", "t", "X-API-Token", generated=True, nats="nats://127.0.0.1:4222", agent_seed=None)
    assert "cluster" not in single


def test_more_replicas_than_servers_stops_up_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(environ={"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "3", "SANDBOXD_STREAMS_REPLICAS": "5"})
    assert run_up(settings) == CONFIG_ERROR_EXIT
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert "SANDBOXD_STREAMS_REPLICAS=5" in err
    assert "SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE=3" in err


class Forming:
    """A JetStream API that answers like a cluster still forming, then for real."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "answered"


async def test_a_forming_cluster_is_waited_for() -> None:
    forming = Forming(
        NatsTimeoutError(),
        NoRespondersError(),
        ServiceUnavailableError(),
        APIError(code=500, err_code=10023, description="insufficient resources"),
        APIError(code=503, err_code=10008, description="JetStream system temporarily unavailable"),
    )
    assert await wait_while_forming(forming, "test", timeout=30) == "answered"
    assert forming.calls == 6


async def test_other_errors_are_not_waited_out() -> None:
    refused = Forming(APIError(code=400, err_code=10058, description="stream name already in use"))
    with pytest.raises(APIError):
        await wait_while_forming(refused, "test", timeout=30)
    assert refused.calls == 1
    never = Forming(*(NoRespondersError() for _ in range(1000)))
    with pytest.raises(StackError, match=r"test did not answer within 0\.2s"):
        await wait_while_forming(never, "test", timeout=0.2)
