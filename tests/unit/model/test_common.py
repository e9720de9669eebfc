from __future__ import annotations

import pytest

from corral.model.common import labels_match, merge_patch, parse_label_selector


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("tier=web", {"tier": "web"}, True),
        ("tier=web", {"tier": "db"}, False),
        ("tier==web", {"tier": "web"}, True),
        ("tier=web,env!=prod", {"tier": "web", "env": "dev"}, True),
        ("tier=web,env!=prod", {"tier": "web", "env": "prod"}, False),
        ("env!=prod", {}, True),
        ("gpu", {"gpu": ""}, True),
        ("gpu", {"cpu": "x"}, False),
        ("", {"a": "b"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert labels_match(labels, parse_label_selector(selector)) is matches


def test_bad_selector_names_the_term() -> None:
    with pytest.raises(ValueError, match="'=web'"):
        parse_label_selector("=web")


def test_merge_patch_follows_rfc_7396() -> None:
    spec = {"vcpus": 1, "labels": {"a": "1", "b": "2"}}
    patched = merge_patch(spec, {"labels": {"a": None, "c": "3"}, "vcpus": 2})
    assert patched == {"vcpus": 2, "labels": {"b": "2", "c": "3"}}
    assert spec == {"vcpus": 1, "labels": {"a": "1", "b": "2"}}


def test_time_ids_are_uuid7_and_sort_by_creation() -> None:
    import time
    import uuid

    from corral.model.common import new_time_id

    ids = []
    for _ in range(5):
        ids.append(new_time_id())
        time.sleep(0.002)
    assert ids == sorted(ids)
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert len(set(ids)) == 5
