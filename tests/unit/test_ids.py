"""random_uuid gives what str(uuid.uuid4()) gives: canonical version 4 UUIDs, never twice."""

from __future__ import annotations

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
