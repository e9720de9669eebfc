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
