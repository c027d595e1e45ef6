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


def validation_message(errors: list[dict[str, Any]], descriptions: dict[str, str], body: Any) -> tuple[str, str | None]:
    """pydantic's errors for a request body -> (one message naming the field and the value, param).

    The message names the path into the body (`messages.0.content`); param is its top-level field.
    A union (e.g. `prompt`, a message's `content`) yields one error per alternative, each path
    ending in pydantic's name of the alternative (`prompt.list[int].0`): the message names the
    part of the path that is in `body`, the value given, and for a top-level field what it takes,
    from its description."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail}); send a JSON object", None
    loc = _loc(first)
    if not loc:
        return f"the request body must be a JSON object: {first.get('msg', '')}", None
    field = str(loc[0])
    if first.get("type") == "missing":
        return f"'{'.'.join(map(str, loc))}' is required", field
    path = _in_body(loc, body)
    alternatives = [e for e in errors if _in_body(_loc(e), body) == path]
    expected = f"; expected {descriptions[field]}" if len(path) == 1 and field in descriptions \
        and len(alternatives) > 1 else ""
    return (f"invalid '{'.'.join(map(str, path))}' = {_short(first.get('input'))}: "
            f"{first.get('msg', 'invalid value')}{expected}"), field


def _loc(error: dict[str, Any]) -> list[str | int]:
    return [p for p in error.get("loc", ()) if p != "body"]


def _in_body(loc: list[str | int], body: Any) -> list[str | int]:
    """The longest start of `loc` that indexes into `body` (at least its top-level field)."""
    path, node = loc[:1], body.get(loc[0]) if isinstance(body, dict) else None
    for key in loc[1:]:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
        else:
            break
        path.append(key)
    return path


def unreadable_body(cause: BaseException | None) -> str:
    """Why a body that FastAPI could not parse (it answers a bare 400 "There was an error parsing
    the body", raised from the parser's exception) is unreadable."""
    if isinstance(cause, RecursionError):
        return "its JSON nests too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return f"it is not UTF-8 ({cause.reason} at byte {cause.start})"
    if cause is not None:  # e.g. a number of more than sys.get_int_max_str_digits() digits
        # (whose message ends in advice for the server's own code: cut at its "; ")
        return f"{type(cause).__name__}: {str(cause).split('; ')[0]}"
    return "it could not be parsed"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
