"""Runtime: one rank's model shard, KV cache and tokenizer, built from a RunConfig, and a
generation loop over the engine - each replica's driver runs the Engine, its other ranks its steps.

    ctx = init_parallel(cfg.parallel, cfg.model.device)
    rt = build_runtime(cfg, ctx)
    results = generate(rt, ["Hello"], SamplingParams(max_new_tokens=16))  # list on drivers, None elsewhere
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kernels.dispatch import Backend, KernelOps, choose_backend, choose_pdl
from polar_dist import envs
from polar_dist.config import RunConfig
from polar_dist.engine.engine import Engine, worker_loop
from polar_dist.engine.kv_cache import BlockAllocator
from polar_dist.engine.memory import kv_bytes_per_block, size_kv_cache
from polar_dist.engine.runner import ModelRunner
from polar_dist.engine.sampling import SampleOutput, SamplingParams, TokenLogprobs
from polar_dist.engine.scheduler import Scheduler
from polar_dist.engine.step import BatchMirror, Step, encode
from polar_dist.errors import UserError
from polar_dist.log import get_logger
from polar_dist.models.build import BuildContext
from polar_dist.models.checkpoint import TensorDictReader
from polar_dist.models.loader import DTYPES, ModelSource, build_model, resolve_source
from polar_dist.model_spec import ModelSpec
from polar_dist.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from polar_dist.parallel.context import ParallelContext
from polar_dist.parallel.plan import make_shard_plan
from polar_dist.sparsity.artifact import load_artifact
from polar_dist.sparsity.policy import SparsityPolicy, make_policy, model_identity

log = get_logger(__name__)


@dataclass
class Runtime:
    cfg: RunConfig
    ctx: ParallelContext
    spec: ModelSpec
    runner: ModelRunner
    tokenizer: Tokenizer
    max_seq_len: int
    cache_setting: str  # the config field that sized the KV cache, named in messages
    policy: SparsityPolicy  # what the decode steps compute, per layer


@dataclass
class Completion:
    """A finished request of `generate`."""

    request_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


def resolve_source_once(cfg: RunConfig, ctx: ParallelContext) -> ModelSource:
    """The replica's driver resolves the model first, so a GGUF file is converted once and the
    other ranks read its cache; a user error on the driver is raised on every rank of the
    replica with the same message. (Replicas convert independently: they share nothing, and the
    cache's writes are atomic.)"""
    if ctx.tp_size == 1:
        return resolve_source(cfg.model)
    source, failure = None, None
    if ctx.is_driver:
        try:
            source = resolve_source(cfg.model)
        except Exception as e:  # told to every rank, then raised here unchanged
            failure = (isinstance(e, UserError), str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
            ctx.broadcast_object(failure)
            raise
        ctx.broadcast_object(failure)
        return source
    failure = ctx.broadcast_object()
    if failure is not None:
        user_error, message = failure
        if user_error:
            raise UserError(message)
        raise RuntimeError(f"the replica's driver could not load the model: {message}")
    return resolve_source(cfg.model)


def load_sparsity(cfg: RunConfig, spec: ModelSpec, tp: int) -> tuple[SparsityPolicy, TensorDictReader | None]:
    """The run's sparsity policy and its router weights (None: dense, or random routers)."""
    s = cfg.sparsity
    meta, routers = None, None
    if s.routers and s.routers != "random":
        weights, meta = load_artifact(s.routers, expect=model_identity(spec))
        routers = TensorDictReader(weights)
    return make_policy(s, spec, meta, tp, cfg.engine.max_batch_size), routers


def make_tokenizer(cfg: RunConfig, source: ModelSource) -> Tokenizer:
    """The run's tokenizer: the model directory's own, or bytes (`model.tokenizer`)."""
    if cfg.model.tokenizer == "bytes":
        if source.spec.vocab_size < 256:
            raise UserError(f"model.tokenizer = bytes needs a vocabulary of at least 256 ids, this model has "
                            f"{source.spec.vocab_size}; use the model's own tokenizer (model.tokenizer = auto)")
        return ByteTokenizer()
    if source.directory is None or not any(source.directory.glob("tokenizer*")):
        raise UserError("this model has no tokenizer files; set model.tokenizer = bytes")
    return HFTokenizer(source.directory, source.spec.eos_token_ids)


def build_runtime(cfg: RunConfig, ctx: ParallelContext) -> Runtime:
    source = resolve_source_once(cfg, ctx)
    spec = source.spec
    plan = make_shard_plan(spec, ctx.tp_rank, ctx.tp_size)  # checks tp against the heads before any weight
    max_seq_len = cfg.engine.max_seq_len or spec.max_position_embeddings
    if max_seq_len > spec.max_position_embeddings:
        raise UserError(f"engine.max_seq_len = {max_seq_len} exceeds the model's max_position_embeddings "
                        f"({spec.max_position_embeddings}); lower engine.max_seq_len")
    window = source.hf_config.get("sliding_window")
    if window and source.hf_config.get("use_sliding_window", True) and max_seq_len > window:
        raise UserError(f"engine.max_seq_len = {max_seq_len} exceeds the model's sliding_window ({window}), which "
                        f"this runtime does not implement; set engine.max_seq_len <= {window}")
    tokenizer = make_tokenizer(cfg, source)
    dtype = DTYPES[cfg.model.dtype]
    backend = choose_backend(envs.KERNEL_BACKEND.get(), ctx.device, dtype)
    ops = KernelOps(backend, pdl=choose_pdl(envs.PDL.get(), backend, ctx.device),
                    blas_choice=envs.BLAS_CHOICE.get())
    if ops.backend is Backend.TRITON:
        from kernels.select_attention import MAX_HEAD_DIM, head_dim_supported  # imports triton: only when used

        if not head_dim_supported(spec.head_dim):
            raise UserError(f"head_dim {spec.head_dim} of this model has no Triton decode kernel (head dims "
                            f"1-{MAX_HEAD_DIM}); run it with model.dtype = float32, on the CPU, or with "
                            f"{envs.KERNEL_BACKEND.name}=torch")
    policy, routers = load_sparsity(cfg, spec, ctx.tp_size)
    t0 = time.perf_counter()
    model = build_model(source, BuildContext(spec, plan, ctx.tp_comm, ops, dtype, ctx.device, policy), max_seq_len,
                        routers)
    log.info("loaded %s (%d layers, tp=%d%s, launched by %s, %s kernels) in %.1f s on %s", spec.model_type,
             spec.num_layers, ctx.tp_size, f" x dp={ctx.num_replicas}" if ctx.num_replicas > 1 else "",
             ctx.info.launcher.value, ops.backend.value + (" + PDL" if ops.pdl else ""), time.perf_counter() - t0,
             ctx.device)
    if not policy.is_dense:
        log.info("sparse decode: %s routing, %s scope, KV groups per layer %s of %d%s", policy.routing.value,
                 policy.scope.value, list(policy.head_k), policy.num_groups,
                 "" if policy.neuron_k is None else ", batch-union MLP neurons")
    e = cfg.engine
    sizing = size_kv_cache(e, spec, plan, max_seq_len, dtype, ctx.device, model)
    num_blocks = ctx.all_reduce_min(sizing.num_blocks)  # the ranks' caches must match
    per_block = kv_bytes_per_block(spec, plan, e.block_size, dtype)
    log.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB per rank), %.1f sequences of "
             "engine.max_seq_len = %d; from %s", num_blocks, e.block_size, num_blocks * e.block_size,
             num_blocks * per_block / (1 << 30), num_blocks * e.block_size / max_seq_len, max_seq_len, sizing.detail)
    if num_blocks * e.block_size < max_seq_len:
        log.warning("the KV cache holds %d tokens, fewer than engine.max_seq_len = %d: sequences stop there "
                    "(finish reason 'length'); raise %s", num_blocks * e.block_size, max_seq_len, sizing.setting)
    runner = ModelRunner(model, spec, plan, num_blocks=num_blocks, block_size=e.block_size, dtype=dtype,
                         device=ctx.device, max_batch_size=e.max_batch_size, max_seq_len=max_seq_len,
                         cuda_graphs=e.cuda_graphs,
                         attention_groups=policy.typical_groups_local(plan.num_kv_heads_local), comm=ctx.tp_comm)
    return Runtime(cfg, ctx, spec, runner, tokenizer, max_seq_len, sizing.setting, policy)


def new_scheduler(rt: Runtime) -> Scheduler:
    """A scheduler over the runtime's whole cache (the Engine makes its own; tests drive one by hand)."""
    e = rt.cfg.engine
    return Scheduler(BlockAllocator(rt.runner.num_blocks), e.block_size, e.max_batch_size, rt.max_seq_len,
                     rt.tokenizer.eos_token_ids, rt.spec.vocab_size, e.max_num_batched_tokens, rt.cache_setting)


class LocalSteps:
    """Steps planned by a scheduler on every rank from the same inputs, each rank turning the
    delta into its Step locally: no messages. For jobs that feed the tokens themselves (teacher-
    forced evaluation, calibration prefill), where every rank knows the next inputs; serving goes
    through the Engine.

        steps = LocalSteps(rt)
        steps.scheduler.add(prompt_ids, SamplingParams(max_new_tokens=n, ignore_eos=True), seed=0)
        while (step := steps.next()) is not None:
            logits = rt.runner.logits(step)          # (rows of step.sample_ids, V)
            steps.feed(step, next_tokens)            # one token per sampled row
    """

    def __init__(self, rt: Runtime) -> None:
        e = rt.cfg.engine
        self.scheduler = new_scheduler(rt)
        self.mirror = BatchMirror(e.max_batch_size, rt.runner.max_blocks_per_seq, e.block_size)

    def next(self) -> Step | None:
        """The next step, or None when nothing is left to run."""
        delta = self.scheduler.schedule()
        return None if delta is None else self.mirror.apply(encode(delta))

    def feed(self, step: Step, token_ids: list[int]) -> None:
        """Give each sampled row of `step` (step.sample_ids, in order) its next token."""
        self.scheduler.accept(step, SampleOutput(list(token_ids), [None] * len(token_ids), []))


def generate_ids(rt: Runtime, prompts: list[list[int]], params: SamplingParams) -> list[Completion] | None:
    """Generate for token-id prompts. Every rank of a replica calls it with the same prompts; the
    replica's driver returns the finished requests in prompt order, the others return None."""
    check = new_scheduler(rt)
    for p in prompts:  # validates on every rank, before any collective
        check.validate(p)
    if not rt.ctx.is_driver:
        worker_loop(rt)
        return None
    with Engine(rt) as engine:  # an error leaves without STOP (see Engine.shutdown)
        ids = [engine.add_request(p, params) for p in prompts]
        done: dict[int, Completion] = {}
        pending = {i: Completion(i, list(p), [], "") for i, p in zip(ids, prompts)}
        while engine.has_unfinished():
            for out in engine.step():
                c = pending[out.request_id]
                c.output_ids += out.new_token_ids
                if out.logprobs is not None:
                    c.logprobs = (c.logprobs or []) + out.logprobs
                if out.prompt_logprobs is not None:
                    c.prompt_logprobs = out.prompt_logprobs
                if out.finished:
                    c.finish_reason = out.finish_reason or ""
                    done[out.request_id] = pending.pop(out.request_id)
    return [done[i] for i in ids]


def generate(rt: Runtime, prompts: list[str], params: SamplingParams) -> list[Completion] | None:
    return generate_ids(rt, [rt.tokenizer.encode(p) for p in prompts], params)
