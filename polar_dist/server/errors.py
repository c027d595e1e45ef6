"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` with a 4xx that
names the problem, or a 5xx when the server cannot serve.

    raise APIError(400, "n = 99 must be in [1, 8]", param="n")
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

# status -> the OpenAI API's error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[dict[str, Any]], descriptions: dict[str, str]) -> tuple[str, str | None]:
    """pydantic's errors for a request body -> (one message naming the field and the value, param).

    A union field (e.g. `prompt`) yields one error per alternative; the message names the field,
    the value given and what the field takes, from its description."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail}); send a JSON object", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return f"the request body must be a JSON object: {first.get('msg', '')}", None
    field = loc[0]
    value = _short(first.get("input"))
    if first.get("type") == "missing":
        return f"'{field}' is required", field
    same = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == [field]]
    path = ".".join(loc) if len(same) == 1 else field
    expected = f"; expected {descriptions[field]}" if field in descriptions and len(same) > 1 else ""
    return f"invalid '{path}' = {value}: {first.get('msg', 'invalid value')}{expected}", field


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
