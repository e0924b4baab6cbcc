"""`infra/nats/`: nats-server configs for an external server, generated from shared/nats_roles.py
(a test fails when they are stale; `sandboxctl nats-infra` rewrites them).

- `single.conf`: one server on 127.0.0.1:4222;
- `cluster-n1.conf` .. `cluster-n3.conf`: a 3-node JetStream cluster on 127.0.0.1, client
  ports 4222-4224, routes on 6222-6224 (use `SANDBOXD_STREAMS_REPLICAS=3`);
- `accounts.conf`: the accounts, users and permissions every one of them includes.
The users' public nkeys are not shipped: `sandboxctl nats-credentials --out <dir>` writes the
seeds and the `users.conf` that `accounts.conf` includes.
"""

from __future__ import annotations

from pathlib import Path

from shared.nats_server_config import ACCOUNTS_FILE, USERS_FILE, cluster_nodes, render_accounts, render_server

INFRA_DIR = Path(__file__).resolve().parents[1] / "infra" / "nats"
CLUSTER = cluster_nodes(3, client_port=4222, cluster_port=6222)


def generate() -> dict[str, str]:
    files = {
        ACCOUNTS_FILE: render_accounts(),
        # Store directories are relative to where nats-server runs.
        "single.conf": render_server(server_name="sandboxd", port=4222, store_dir="data/single"),
    }
    for node in CLUSTER:
        files[f"cluster-{node.name.removeprefix('sandboxd-')}.conf"] = render_server(
            server_name=node.name, port=node.client_port, store_dir=f"data/{node.name}", cluster=(node, CLUSTER)
        )
    return files


def write(directory: Path = INFRA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, text in generate().items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def stale(directory: Path = INFRA_DIR) -> list[str]:
    """Generated files that are missing or different, and .conf files no longer generated
    (`users.conf` is the operator's, never generated here)."""
    wanted = generate()
    out = [
        name
        for name, text in wanted.items()
        if not (directory / name).is_file() or (directory / name).read_text() != text
    ]
    existing = {p.name for p in directory.glob("*.conf")} - {USERS_FILE}
    out += sorted(existing - set(wanted))
    return out
