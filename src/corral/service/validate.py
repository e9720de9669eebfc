"""Turn pydantic's errors into corral's: the field, a short rule and a sentence to act on."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from corral.errors import FieldError, ValidationFailed

__all__ = ["field_errors", "parse"]

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


def _message(err: Any, model: type[BaseModel]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if kind == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if kind == "less_than":
        return f"must be < {ctx.get('lt')}"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "extra_forbidden":
        allowed = ", ".join(sorted(model.model_fields))
        return f"unknown field; allowed fields are: {allowed}"
    if kind == "missing":
        return "is required"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        expected = kind.removesuffix("_type").removesuffix("_parsing")
        expected = {"int": "an integer", "str": "a string", "dict": "an object",
                    "bool": "true or false", "float": "a number", "model": "an object",
                    "list": "a list"}.get(expected, expected)  # fmt: skip
        return f"must be {expected}, got {type(err.get('input')).__name__}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    return str(err["msg"])


def field_errors(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> list[FieldError]:
    out = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        out.append(
            FieldError(
                field=prefix + loc,
                rule=_RULES.get(err["type"], "type" if err["type"].endswith("_type") else "invalid"),
                message=_message(err, model),
            )
        )
    return out


def parse(model: type[M], data: Any, *, prefix: str = "") -> M:
    """Validate ``data`` (decoded JSON) as ``model`` or raise ValidationFailed naming fields."""
    if not isinstance(data, dict):
        raise ValidationFailed.one(prefix.rstrip("."), "type", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc, model, prefix)) from None
