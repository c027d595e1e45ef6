"""The server tests' tiny random model: its run config, raw HTTP requests to it, and the shape of
an OpenAI error body (polar_dist/server/errors.py).

    config = write_config(tmp / "run.yaml", model_dir, engine={"max_seq_len": 64}, server={"max_n": 4})
    with ServerProcess(config) as server:
        r = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "n": 99})
        assert_openai_error(r, 400, param="n")
        assert ok_completion(server)                      # the server still serves
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import requests
import yaml

from support.server import ServerProcess

MODEL_NAME = "tiny"  # server.model_name of every config written here


def write_config(path: Path, model_dir: Path, *, engine: dict[str, Any], server: dict[str, Any],
                 tokenizer: str = "bytes") -> Path:
    """A run config serving `model_dir` on CPU as MODEL_NAME; `tokenizer`: "bytes", or "auto" for
    the directory's own (see support.tiny_models.save_chat_tokenizer)."""
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model_dir), "tokenizer": tokenizer, "device": "cpu"},
        "engine": engine,
        "server": {"model_name": MODEL_NAME, **server},
    }))
    return path


def post(server: ServerProcess, path: str, body: Any, headers: dict[str, str] | None = None,
         timeout: float = 120) -> requests.Response:
    """POST `body` (an object as JSON, or bytes / str sent as they are) with the server's API key."""
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    auth = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    return requests.post(server.url + path, data=data, timeout=timeout,
                         headers={"Content-Type": "application/json", **auth, **(headers or {})})


def ok_completion(server: ServerProcess) -> list[int]:
    """A small greedy completion that must succeed; its token ids."""
    r = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "still here?", "max_tokens": 4,
                                         "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def check_error_body(body: Any) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}` exactly, as errors.py builds it; the inner dict."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), body
    assert error["param"] is None or isinstance(error["param"], str), body
    assert error["code"] is None or isinstance(error["code"], str), body
    return error


def assert_openai_error(r: requests.Response, status: int, words: str = "", param: str | None = None) -> dict:
    """r is `status` with an OpenAI error body whose message contains `words` and, when `param` is
    given, whose param is it; the error dict."""
    assert r.status_code == status, (r.status_code, r.text[:2000])
    error = check_error_body(r.json())
    assert words in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error
