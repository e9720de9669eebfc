"""Turn pydantic's errors into corral's: the field, a short rule and a sentence to act on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from corral.errors import FieldError, ValidationFailed

__all__ = ["field_errors", "parse", "to_field_error"]

M = TypeVar("M", bound=BaseModel)

_RULES = {
    "greater_than_equal": "ge",
    "greater_than": "gt",
    "less_than_equal": "le",
    "less_than": "lt",
    "extra_forbidden": "unknown-field",
    "missing": "required",
    "string_too_long": "max-length",
    "string_too_short": "min-length",
    "string_pattern_mismatch": "pattern",
    "literal_error": "one-of",
    "value_error": "format",
    "dict_type": "type",
    "model_type": "type",
}


def _message(err: Mapping[str, Any], allowed: Iterable[str] | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "less_than_equal": ("<=", "le"),
        "greater_than": (">", "gt"),
        "less_than": ("<", "lt"),
    }
    if kind in bounds:
        op, key = bounds[kind]
        return f"must be {op} {ctx.get(key)}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "extra_forbidden":
        if allowed is None:
            return "unknown field"
        return f"unknown field; allowed fields are: {', '.join(sorted(allowed))}"
    if kind == "missing":
        return "is required"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.removesuffix("_type").removesuffix("_parsing")
        expected = _EXPECTED.get(expected, expected)
        return f"must be {expected}, got {type(err.get('input')).__name__}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"])


_EXPECTED = {
    "int": "an integer",
    "str": "a string",
    "dict": "an object",
    "bool": "true or false",
    "float": "a number",
    "model": "an object",
    "list": "a list",
}


def to_field_error(
    err: Mapping[str, Any], field: str, allowed: Iterable[str] | None = None
) -> FieldError:
    """One pydantic error as a FieldError; ``allowed`` lists the fields of the object."""
    kind = str(err["type"])
    rule = _RULES.get(kind, "type" if kind.endswith(("_type", "_parsing")) else "invalid")
    return FieldError(field=field, rule=rule, message=_message(err, allowed))


def field_errors(
    exc: ValidationError, model: type[BaseModel], prefix: str = ""
) -> list[FieldError]:
    return [
        to_field_error(err, prefix + ".".join(str(p) for p in err["loc"]), model.model_fields)
        for err in exc.errors(include_url=False)
    ]


def parse(model: type[M], data: Any, *, prefix: str = "") -> M:
    """Validate ``data`` (decoded JSON) as ``model`` or raise ValidationFailed naming fields."""
    if not isinstance(data, dict):
        raise ValidationFailed.one(prefix.rstrip("."), "type", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc, model, prefix)) from None
