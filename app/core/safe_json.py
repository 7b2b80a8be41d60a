"""Request values Postgres can store: no NUL characters, no unpaired surrogates, bounded nesting.

JSON lets a client send `"\\u0000"` and `"\\ud800"`, but Postgres `text` and `jsonb` refuse U+0000,
and an unpaired surrogate has no UTF-8 encoding, so either one used to fail inside the database
driver, after validation, as a 500. Deeply nested JSON (hundreds of levels, still under the JSON
parser's limit) failed later still, in serialization. These types refuse all three while the request
is validated: a 422 `invalid_request` naming the field, and the path inside it.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

MAX_DEPTH = 32
"""Deeper than any real job config or instruction set (they nest 3 to 5 levels)."""


def text_problem(value: str) -> str | None:
    if "\x00" in value:
        return "must not contain NUL (U+0000) characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it has an unpaired surrogate)"
    return None


def check_text(value: str) -> str:
    if problem := text_problem(value):
        raise ValueError(problem)
    return value


def check_json(value: Any) -> Any:
    """Walk a decoded JSON value without recursion; raise at the first string or depth problem."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, str):
            if problem := text_problem(node):
                raise ValueError(f"{path or 'value'} {problem}")
        elif isinstance(node, dict):
            for key, child in node.items():
                if isinstance(key, str) and (problem := text_problem(key)):
                    raise ValueError(f"a key of {path or 'the object'} {problem}")
                stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(node))
    return value


StoredText = Annotated[str, AfterValidator(check_text)]
"""A string that Postgres text can hold."""

JSONObject = Annotated[dict[str, Any], AfterValidator(check_json)]
"""A JSON object that Postgres jsonb can hold, at most MAX_DEPTH levels deep."""
