"""The names `corral.client` promises are importable, and every error is among them."""

from __future__ import annotations

import inspect

import corral.client
from corral.client import errors


def test_every_exported_name_exists() -> None:
    missing = [name for name in corral.client.__all__ if not hasattr(corral.client, name)]
    assert missing == []


def test_every_error_class_is_exported_with_an_exit_code() -> None:
    classes = [
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, errors.CorralError)
    ]
    assert {c.__name__ for c in classes} <= set(corral.client.__all__)
    assert {c.exit_code for c in classes} == {1, 3, 4, 5}
