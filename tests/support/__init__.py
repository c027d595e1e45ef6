"""Code the tests share: multi-rank runs, tiny random HF models, the tolerance rule.

How it is imported: `tests/` is a directory on `sys.path` and this package is the top-level
`support` (`from support.ranks import run_ranks`). `tests/conftest.py` puts `tests/` on
`sys.path` once, before any test module is imported, so this holds under every pytest import
mode; ranks started by `run_ranks` inherit that `sys.path` (multiprocessing's spawn passes it on).
The one script that launchers start by path, `tests/support/tp_script.py`, puts `tests/` and the
repository root on `sys.path` itself, so torchrun, mpirun and the deepspeed launcher need no
PYTHONPATH for it. Test modules import from here, never from conftest or from each other.

    ranks.py        free_port(), listen_port(), run_ranks(fn, world_size, *args): spawned gloo ranks; start_ranks
    tiny_models.py  tiny random HF models, transformers' reference logits and the runtime's; a chat tokenizer for them
    server.py       ServerProcess: launch/serve.py as a real process, ready once /health answers
    tiny_server.py  the server tests' run config, raw requests, the OpenAI error body's shape
    tolerance.py    the rule max|out - ref| <= 2 * max|torch_same_dtype - ref| + eps
    tp_script.py    the tiny-model logits check as a script for torchrun / mpirun / deepspeed
    netns.py        two_hosts(): two network namespaces joined by a veth pair, as two cluster nodes
"""
