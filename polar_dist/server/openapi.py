"""The published /openapi.json: FastAPI's spec of the routes, corrected in two ways.

- An invalid body gets the OpenAI API's 400 with its error body (errors.py), never FastAPI's 422:
  the 422 and its schemas (HTTPValidationError, ValidationError) are left out.
- With stream = true a generation route answers 200 with server-sent events, so its 200 also
  documents text/event-stream. Open API 3.1 reads an event stream's schema as the schema of one
  event: `data` is `[DONE]` or JSON, a chunk or an error (the error an answer meets after its
  headers went out).

    publish_spec(app, streams={"/v1/completions": CompletionChunk})   # once, after the routes
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from polar_dist.server.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"


def publish_spec(app: FastAPI, streams: dict[str, type[BaseModel]]) -> None:
    """Replaces app.openapi; `streams`: route path -> the model of its stream's chunks."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _correct(build(), streams)  # FastAPI caches the spec in app.openapi_schema: corrected once, in place
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _correct(spec: dict[str, Any], streams: dict[str, type[BaseModel]]) -> None:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for item in spec["paths"].values():
        for operation in item.values():
            operation["responses"].pop("422", None)
    for path, chunk in streams.items():
        for model in (chunk, ErrorResponse):
            schema = model.model_json_schema(ref_template=_REF, mode="serialization")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        payload = {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)},
                             {"$ref": _REF.format(model=ErrorResponse.__name__)}]}
        event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}
        content = spec["paths"][path]["post"]["responses"]["200"]["content"]
        content["text/event-stream"] = {"schema": event}
