"""Configuration: defaults, a TOML file, SANDBOXD_* variables, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.config import ConfigError, check_embedded_replicas, load_settings
from shared.nats_connection import nats_servers


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert (settings.http.host, settings.http.port) == ("127.0.0.1", 8123)
    assert settings.api.token_header == "X-API-Token"
    assert settings.nats.url is None
    assert settings.sandbox.network_mode == "none"


def test_variables_are_converted_to_the_fields_types() -> None:
    settings = load_settings(
        environ={
            "SANDBOXD_HTTP_PORT": "9000",
            "SANDBOXD_SANDBOX_COMMAND": '["sleep", "5"]',
            "SANDBOXD_SANDBOX_INIT": "false",
            "SANDBOXD_API_TOKEN": "t",
        }
    )
    assert settings.http.port == 9000
    assert settings.sandbox.command == ["sleep", "5"]
    assert settings.sandbox.init is False
    assert settings.api.token == "t"


def test_a_file_is_read_and_variables_win(tmp_path: Path) -> None:
    file = tmp_path / "sandboxd.toml"
    file.write_text('[http]\nport = 9100\nhost = "0.0.0.0"\n[sandbox]\nttl_seconds = 42\n')
    settings = load_settings(environ={"SANDBOXD_CONFIG": str(file), "SANDBOXD_HTTP_PORT": "9200"})
    assert (settings.http.host, settings.http.port, settings.sandbox.ttl_seconds) == ("0.0.0.0", 9200, 42)


@pytest.mark.parametrize(
    ("environ", "needles"),
    [
        ({"SANDBOXD_HTTP_PORT": "eighty"}, ["http.port", "SANDBOXD_HTTP_PORT", "int"]),
        ({"SANDBOXD_HTTP_PORT": "70000"}, ["http.port", "65535"]),
        ({"SANDBOXD_SANDBOX_CPUS": "0"}, ["sandbox.cpus"]),
        ({"SANDBOXD_RUNTIME_MAX_CONCURRENT_CREATES": "0"}, ["runtime.max_concurrent_creates", ">= 1"]),
        ({"SANDBOXD_HTTP_PROT": "1"}, ["SANDBOXD_HTTP_PROT", "did you mean SANDBOXD_HTTP_PORT"]),
        ({"SANDBOXD_CONFIG": "/nonexistent/sandboxd.toml"}, ["SANDBOXD_CONFIG", "/nonexistent/sandboxd.toml"]),
    ],
)
def test_errors_name_the_key(environ: dict[str, str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    for needle in needles:
        assert needle in str(caught.value)


def test_a_bad_file_value_names_the_file_and_key(tmp_path: Path) -> None:
    file = tmp_path / "sandboxd.toml"
    file.write_text("[runtime]\nmax_in_flight = 0\n")
    with pytest.raises(ConfigError, match=r"runtime\.max_in_flight.*sandboxd\.toml"):
        load_settings(environ={"SANDBOXD_CONFIG": str(file)})
    file.write_text("[runtime]\nno_such_key = 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        load_settings(environ={"SANDBOXD_CONFIG": str(file)})


def test_handled_commands_are_remembered_at_least_as_long_as_a_command_is_queued() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"SANDBOXD_STREAMS_HANDLED_MAX_AGE_SECONDS": "3600"})
    message = str(caught.value)
    assert "SANDBOXD_STREAMS_HANDLED_MAX_AGE_SECONDS=3600" in message
    assert "streams.commands_max_age_seconds" in message
    ok = load_settings(
        environ={"SANDBOXD_STREAMS_HANDLED_MAX_AGE_SECONDS": "3600", "SANDBOXD_STREAMS_COMMANDS_MAX_AGE_SECONDS": "600"}
    )
    assert ok.streams.handled_max_age_seconds == 3600


def test_the_redrive_grace_must_exceed_the_claim_timeout() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"SANDBOXD_REAPER_REDRIVE_GRACE_SECONDS": "60"})
    message = str(caught.value)
    assert "SANDBOXD_REAPER_REDRIVE_GRACE_SECONDS" in message
    assert "runtime.claim_timeout_seconds" in message
    ok = load_settings(
        environ={"SANDBOXD_REAPER_REDRIVE_GRACE_SECONDS": "60", "SANDBOXD_RUNTIME_CLAIM_TIMEOUT_SECONDS": "30"}
    )
    assert ok.reaper.redrive_grace_seconds == 60


@pytest.mark.parametrize(
    ("environ", "needles"),
    [
        (
            {"SANDBOXD_SANDBOX_MAX_TTL_SECONDS": "100", "SANDBOXD_SANDBOX_MAX_LIFETIME_SECONDS": "50"},
            ["SANDBOXD_SANDBOX_MAX_TTL_SECONDS", "sandbox.max_lifetime_seconds"],
        ),
        (
            {"SANDBOXD_SANDBOX_TTL_SECONDS": "100", "SANDBOXD_SANDBOX_MAX_TTL_SECONDS": "50"},
            ["SANDBOXD_SANDBOX_TTL_SECONDS", "sandbox.max_ttl_seconds"],
        ),
        ({"SANDBOXD_SANDBOX_USER": "root"}, ["SANDBOXD_SANDBOX_USER"]),
        ({"SANDBOXD_SANDBOX_MEMORY_LIMIT": "lots"}, ["SANDBOXD_SANDBOX_MEMORY_LIMIT"]),
        ({"SANDBOXD_RUNTIME_MAX_DELIVERIES": "1"}, ["SANDBOXD_RUNTIME_MAX_DELIVERIES"]),
    ],
)
def test_limits_are_checked_and_named(environ: dict[str, str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    for needle in needles:
        assert needle in str(caught.value)


# --------------------------------------------------------------------------- NATS cluster


def test_the_embedded_cluster_gives_streams_a_replica_per_server(tmp_path: Path) -> None:
    three = {"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "3"}
    assert load_settings(environ=three).streams.replicas == 3
    assert load_settings(environ={}).streams.replicas == 1
    # The operator's choice wins, from a variable or a file.
    assert load_settings(environ={**three, "SANDBOXD_STREAMS_REPLICAS": "1"}).streams.replicas == 1
    file = tmp_path / "sandboxd.toml"
    file.write_text("[streams]\nreplicas = 2\n")
    assert load_settings(environ={**three, "SANDBOXD_CONFIG": str(file)}).streams.replicas == 2
    # Another server's replicas are the operator's business (`sandboxctl up` sets them for its children).
    assert load_settings(environ={**three, "SANDBOXD_NATS_URL": "nats://10.0.0.1:4222"}).streams.replicas == 1


def test_nats_url_names_one_server_or_several() -> None:
    def servers(**environ: str) -> list[str]:
        return nats_servers(load_settings(environ=environ).nats)

    assert servers() == ["nats://127.0.0.1:4222"]
    assert servers(SANDBOXD_NATS_URL="nats://n1:4222, nats://n2:4222,nats://n3:4222") == [
        "nats://n1:4222",
        "nats://n2:4222",
        "nats://n3:4222",
    ]
    assert servers(SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE="3", SANDBOXD_NATS_EMBEDDED_PORT="5000") == [
        "nats://127.0.0.1:5000",
        "nats://127.0.0.1:5001",
        "nats://127.0.0.1:5002",
    ]


@pytest.mark.parametrize(
    ("environ", "needles"),
    [
        ({"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "2"}, ["SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE=2", "odd"]),
        ({"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "7"}, ["nats.embedded_cluster_size", "<= 5"]),
        ({"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "0"}, ["nats.embedded_cluster_size", ">= 1"]),
        ({"SANDBOXD_NATS_URL": "nats://a:4222,,nats://b:4222"}, ["nats.url (SANDBOXD_NATS_URL)", "empty"]),
        ({"SANDBOXD_NATS_URL": "nats://a:4222 nats://b:4222"}, ["nats.url (SANDBOXD_NATS_URL)", "commas"]),
        (
            {"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "3", "SANDBOXD_NATS_EMBEDDED_CLUSTER_PORT": "4223"},
            ["SANDBOXD_NATS_EMBEDDED_PORT=4222", "SANDBOXD_NATS_EMBEDDED_CLUSTER_PORT=4223", "overlap"],
        ),
        (
            {"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": "3", "SANDBOXD_NATS_EMBEDDED_PORT": "65534"},
            ["SANDBOXD_NATS_EMBEDDED_PORT=65534", "3 servers"],
        ),
    ],
)
def test_nats_cluster_errors_name_the_key(environ: dict[str, str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=environ)
    for needle in needles:
        assert needle in str(caught.value)


@pytest.mark.parametrize(("size", "replicas"), [("1", "3"), ("3", "5")])
def test_the_embedded_stack_has_no_more_replicas_than_servers(size: str, replicas: str) -> None:
    settings = load_settings(
        environ={"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": size, "SANDBOXD_STREAMS_REPLICAS": replicas}
    )
    with pytest.raises(ConfigError) as caught:
        check_embedded_replicas(settings)
    message = str(caught.value)
    assert f"SANDBOXD_STREAMS_REPLICAS={replicas}" in message
    assert f"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE={size}" in message
    check_embedded_replicas(load_settings(environ={"SANDBOXD_NATS_EMBEDDED_CLUSTER_SIZE": size}))
