"""The garbage collector's tuning every service process gets (shared/service.py)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from shared.service import GC_YOUNG_THRESHOLD, tune_garbage_collector


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("restored_gc")
def test_start_up_objects_are_frozen_and_young_collections_are_rarer() -> None:
    made_at_start_up = [object() for _ in range(3)], {"settings": [1, 2]}
    _, middle, old = gc.get_threshold()
    tune_garbage_collector()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, middle, old)
    assert not any(obj is made_at_start_up for obj in gc.get_objects()), "frozen: no collection walks it"
