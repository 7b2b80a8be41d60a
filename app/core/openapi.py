"""Models that OpenAPI shows though no route validates with them.

Some answers are served as stored, not re-validated: the rows of a job's `samples.jsonl` (a job
written by an older version must stay readable). Their fields reference a model by name
(`WithJsonSchema(rows_of("SampleRow"))`), and `publish_schemas` adds that model, and the models
inside it, to the document's components.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def rows_of(model: str) -> dict[str, Any]:
    """The JSON schema of a list of `model`, by reference."""
    return {"type": "array", "items": {"$ref": REF.format(model=model)}}


def publish_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()  # also kept as app.openapi_schema, and served from there
            _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in top.get("$defs", {}).items():
                if schemas.setdefault(name, schema) != schema:  # two models of one name
                    raise RuntimeError(f"OpenAPI already has another schema named {name!r}")
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
