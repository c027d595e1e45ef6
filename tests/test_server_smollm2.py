"""The server on the embedded SmolLM2-135M at tp = 1 (one process) and tp = 3 (torchrun), through
the official openai client: greedy completions equal launch/generate.py's tokens; usage counts
match the tokenizer; streaming gives the text of the non-streaming answer; chat renders the
model's template; a seeded request gives the same text alone and inside a busy batch; stop strings
cut the text; echo with logprobs scores the prompt as transformers does.

transformers runs on the safetensors directory the GGUF was converted to (see test_engine_smollm2.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("fastapi", reason="the server needs fastapi (scripts/setup.sh installs it)")  # e.g. the GPU host
import torch

from support.server import ServerProcess

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/smollm2-135m.yaml"
MODEL = "smollm2-135m"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
NEW_TOKENS = 16
ENGINE = ["engine.max_batch_size=8", "engine.max_seq_len=512", "parallel.timeout_s=60"]
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."}]


def _model_dir() -> Path:
    from polar_dist.config import load_config
    from polar_dist.models.loader import resolve_source

    source = resolve_source(load_config(CONFIG).model)
    assert source.directory is not None
    return source.directory


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_dir()))


@pytest.fixture(scope="module")
def generated() -> list[list[int]]:
    """launch/generate.py's greedy tokens for PROMPTS (one process)."""
    cmd = [sys.executable, str(ROOT / "launch/generate.py"), "--config", str(CONFIG), "--max-new-tokens",
           str(NEW_TOKENS)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    for item in ENGINE:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["token_ids"] for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module", params=[1, 3], ids=["tp1", "tp3"])
def server(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with ServerProcess(CONFIG, tp=request.param, overrides=ENGINE) as s:
        yield s


def test_greedy_completions_equal_generate_and_usage_matches_the_tokenizer(
        server: ServerProcess, generated: list[list[int]], tokenizer: Any) -> None:
    r = server.client().completions.create(model=MODEL, prompt=PROMPTS, max_tokens=NEW_TOKENS, temperature=0,
                                           extra_body={"return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.token_ids for c in r.choices] == generated
    for c, ids in zip(r.choices, generated):
        assert c.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert c.finish_reason == ("stop" if ids[-1] == tokenizer.eos_token_id else "length")
    assert r.usage.prompt_tokens == sum(len(tokenizer(p).input_ids) for p in PROMPTS)
    assert r.usage.completion_tokens == sum(len(ids) for ids in generated)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_gives_the_non_streaming_text(server: ServerProcess) -> None:
    client = server.client()
    args = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=NEW_TOKENS, temperature=0)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.text for chunk in chunks for c in chunk.choices)
    assert text == whole.choices[0].text and text
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_chat_renders_the_template(server: ServerProcess, tokenizer: Any) -> None:
    client = server.client()
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0,
                                          extra_body={"return_token_ids": True})
    templated = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(templated, add_special_tokens=False).input_ids
    assert "<|im_start|>assistant" in templated  # SmolLM2's ChatML template
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content.strip()
    # the same prompt ids sent as a completion give the same tokens: the template was applied
    plain = client.completions.create(model=MODEL, prompt=ids, max_tokens=NEW_TOKENS, temperature=0,
                                      extra_body={"return_token_ids": True})
    assert chat.choices[0].token_ids == plain.choices[0].token_ids
    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=NEW_TOKENS, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch(server: ServerProcess) -> None:
    client = server.client()
    seeded = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=NEW_TOKENS, temperature=0.9, top_p=0.95, seed=7)
    alone = client.completions.create(**seeded).choices[0].text
    others = [dict(model=MODEL, prompt=p, max_tokens=NEW_TOKENS, temperature=t) for p in PROMPTS for t in (0, 1.0)]
    with ThreadPoolExecutor(len(others) + 1) as pool:
        busy = [pool.submit(client.completions.create, **o) for o in others[:3]]
        together = pool.submit(client.completions.create, **seeded)
        busy += [pool.submit(client.completions.create, **o) for o in others[3:]]
        assert together.result().choices[0].text == alone
        assert all(f.result().choices for f in busy)
    assert client.completions.create(**{**seeded, "seed": 8}).choices[0].text != alone


def test_stop_strings_cut_the_text(server: ServerProcess, tokenizer: Any, generated: list[list[int]]) -> None:
    client = server.client()
    full = tokenizer.decode(generated[1], skip_special_tokens=True)
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    args = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=NEW_TOKENS, temperature=0, stop=[stop, "never-seen"])
    r = client.completions.create(**args)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_echo_scores_the_prompt_as_transformers_does(server: ServerProcess, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text).input_ids
    r = server.client().completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0, echo=True,
                                           logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(text)
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    model = AutoModelForCausalLM.from_pretrained(str(_model_dir()), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()  # (L, V)
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    ours = torch.tensor(lp.token_logprobs[1:len(ids)], dtype=torch.float64)
    assert torch.allclose(ours, ref, atol=2e-3), (ours, ref)
    # lm-eval's greedy check: each scored token's logprob against the best of its top_logprobs
    for token_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 1 and max(top.values()) >= token_lp - 1e-6


LL_DOCS = [("The capital of France is", " Paris."), ("Water is made of hydrogen and", " oxygen."),
           ("One, two, three,", " four, five."), ("The cat sat on the", " mat.")]
GEN_DOCS = [("Q: What colour is the sky on a clear day?\nA:", " Blue"), ("Q: How many legs does a dog have?\nA:", " 4")]
TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
{extra}
"""


def test_lm_eval_local_completions_scores_through_the_server(server: ServerProcess, tokenizer: Any,
                                                             tmp_path: Path) -> None:
    """lm-eval's `local-completions` model against the server: loglikelihood (echo + prompt logprobs)
    equals the runtime's own prompt logprobs for the same tokens; generate_until returns the
    server's greedy text cut at the stop string."""
    if server.tp != 1:
        pytest.skip("lm-eval runs against the tp=1 server; tp=3 answers the same requests in the tests above")
    for name, docs, output_type, extra in (
            ("polar_ll", LL_DOCS, "loglikelihood", "metric_list:\n  - metric: perplexity\n  - metric: acc"),
            ("polar_gen", GEN_DOCS, "generate_until",
             'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
             "metric_list:\n  - metric: exact_match")):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in docs))
        (tmp_path / f"{name}.yaml").write_text(TASKS.format(name=name, data=data, output_type=output_type,
                                                            extra=extra))
    out = tmp_path / "out"
    args = ",".join([f"model={MODEL}", f"base_url={server.url}/v1/completions", f"tokenizer={_model_dir()}",
                     "tokenizer_backend=huggingface", "tokenized_requests=True", "num_concurrent=2", "max_retries=1"])
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                           "--tasks", "polar_ll,polar_gen", "--include_path", str(tmp_path), "--output_path", str(out),
                           "--log_samples"], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                          env={**server.env, "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    samples = {name: [json.loads(line) for f in out.rglob(f"samples_{name}_*.jsonl") for line in f.open()]
               for name in ("polar_ll", "polar_gen")}
    assert len(samples["polar_ll"]) == len(LL_DOCS) and len(samples["polar_gen"]) == len(GEN_DOCS)

    # the runtime's own prompt logprobs for the same token ids (in this process, tp=1)
    from polar_dist.config import load_config
    from polar_dist.engine.sampling import SamplingParams
    from polar_dist.parallel.context import init_parallel
    from polar_dist.runtime import build_runtime, generate_ids

    cfg = load_config(CONFIG, ENGINE)
    rt = build_runtime(cfg, init_parallel(cfg.parallel, "cpu"))
    for s in samples["polar_ll"]:
        context, continuation = s["doc"]["context"], s["doc"]["continuation"]
        ctx_ids = tokenizer(context).input_ids
        whole = tokenizer(context + continuation).input_ids
        done = generate_ids(rt, [whole], SamplingParams(max_new_tokens=1, prompt_logprobs=0))
        assert done is not None
        ours = sum(lp.logprob for lp in done[0].prompt_logprobs[len(ctx_ids) - 1:])
        theirs = float(s["filtered_resps"][0][0])  # [logprob, is_greedy], written as strings
        assert abs(ours - theirs) < 1e-3, (context, continuation, ours, theirs, s["filtered_resps"])
    client = server.client()
    for s in samples["polar_gen"]:
        direct = client.completions.create(model=MODEL, prompt=tokenizer(s["doc"]["context"]).input_ids,
                                           max_tokens=8, temperature=0, stop=["\n"])
        assert s["filtered_resps"][0] == direct.choices[0].text
