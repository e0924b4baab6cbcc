"""random_uuid gives what str(uuid.uuid4()) gives: canonical version 4 UUIDs, never twice."""

from __future__ import annotations

import os
import uuid

from shared.ids import random_uuid


def test_random_uuid_is_a_canonical_version_4_uuid() -> None:
    made = [random_uuid() for _ in range(5000)]
    assert len(set(made)) == len(made)
    for text in made:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every bit outside the version and variant is random: each takes both values.
    ints = [uuid.UUID(text).int for text in made]
    fixed = (0xF << 76) | (0x3 << 62)
    for bit in range(128):
        if not (fixed >> bit) & 1:
            assert {(i >> bit) & 1 for i in ints} == {0, 1}, bit


def test_a_forked_child_does_not_make_its_parents_ids() -> None:
    random_uuid()  # the parent's pool holds the next ids
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, "\n".join(random_uuid() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = set(pipe.read().split("\n"))
    os.waitpid(pid, 0)
    parent = {random_uuid() for _ in range(10)}
    assert len(child) == 10
    assert not child & parent
