"""The OpenAI-compatible HTTP server on rank 0 (launch/serve.py).

    protocol.py     request and response bodies (pydantic; also the published /openapi.json)
    errors.py       OpenAI-style error bodies
    prepare.py      a request -> prompt ids and per-choice SamplingParams, validated
    engine_loop.py  the thread that owns the Engine, and the queues the event loop talks to it through
    detokenize.py   incremental text and stop strings
    generation.py   one request in flight: its choices, their text, abort when it ends early
    responses.py    whole bodies and server-sent events from a generation
    metrics.py      Prometheus metrics in the text format
    app.py          FastAPI routes behind a guard (API key, body size, draining)
    openapi.py      the published /openapi.json: FastAPI's, with the 400s and the streamed events
    serve.py        rank 0 serves, the other ranks step; signals, drain, failure
"""
