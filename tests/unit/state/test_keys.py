from __future__ import annotations

import pytest

from corral.state import keys


def test_layout() -> None:
    assert keys.object_key("vms", "web-1") == "/corral/v1/vms/web-1"
    assert keys.assign_key("n1", "web-1") == "/corral/v1/assign/n1/web-1"
    assert keys.assign_key("n1", "web-1").startswith(keys.assign_prefix("n1"))
    assert keys.liveness_key("n1") == "/corral/v1/liveness/n1"
    assert keys.name_from_key(keys.object_key("tasks", "abc")) == "abc"


def test_a_node_prefix_does_not_cover_another_node() -> None:
    assert not keys.assign_key("n10", "a").startswith(keys.assign_prefix("n1"))


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_bad_key_parts_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid key part"):
        keys.object_key("vms", bad)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        keys.kind_prefix("widgets")
