"""The `integration` marker follows the folder: `just unit` must select exactly the unit tests."""

from __future__ import annotations

import pytest

from tests.conftest import INTEGRATION_DIR


def test_integration_marker_is_exactly_the_integration_folder(request: pytest.FixtureRequest) -> None:
    # The items this run selected: under `-m "not integration"` an unmarked integration test
    # would still be here, in a full run an unmarked one or a marked unit test shows up.
    wrong = [
        item.nodeid
        for item in request.session.items
        if (item.get_closest_marker("integration") is not None) != item.path.is_relative_to(INTEGRATION_DIR)
    ]
    assert not wrong, "integration marker does not match tests/integration:\n" + "\n".join(wrong)
