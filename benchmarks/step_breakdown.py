"""A decode step's GPU time split by module (benchmarks/throughput.py --breakdown): qkv, attention,
out_proj, mlp, routers, all_reduce, sampling, other, as the paper's Fig. 1a splits it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from benchmarks.replica_results import sync

if TYPE_CHECKING:
    from polar_dist.engine.step import Step
    from polar_dist.runtime import Runtime


CATEGORIES = ("qkv", "attention", "out_proj", "mlp", "routers", "all_reduce", "sampling", "other")


def module_category(name: str) -> str | None:
    """The breakdown category of a module by its path in the model (None: not timed by itself)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "qkv":
        return "qkv"
    if leaf in ("o_proj", "out_proj"):
        return "out_proj"
    if name.endswith("mlp.router"):
        return "routers"
    if leaf == "mlp":
        return "mlp"
    if leaf == "attn":
        return "attention"
    return None


def breakdown(rt: Runtime, step: Step, sample_ms: float, step_ms: float) -> dict[str, float]:
    """ms per category of one eager decode step, from the GPU time of the kernels each part
    launched (torch.profiler: a kernel is charged to the annotated region that launched it, so
    host gaps between launches are not counted). Regions nest (attention holds qkv, the head
    routers and out_proj; mlp holds the neuron router; out_proj and mlp hold all-reduces): each
    part is its own kernels only. sampling is as measured in the step; other = the step's time
    not in any part (norms, embedding, LM head, graph gaps)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    dev = rt.ctx.device
    if dev.type != "cuda":
        return {}
    stack: list[tuple[str, record_function]] = []  # (category, open region), innermost last

    def enter(cat: str) -> None:
        region = record_function(f"bd:{cat}")
        region.__enter__()
        stack.append((cat, region))

    def leave() -> None:
        stack.pop()[1].__exit__(None, None, None)

    handles = []
    for name, module in rt.runner.model.named_modules():
        cat = module_category(name)
        if cat is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, cat=cat: enter(cat)))
            handles.append(module.register_forward_hook(lambda m, a, o: leave()))
    patched = []  # (object, attribute, what its instance dict held: restored after)

    def wrap(obj: object, attr: str, cat: str) -> None:
        original = getattr(obj, attr)
        patched.append((obj, attr, vars(obj).get(attr)))

        def timed(*a, **k):  # noqa: ANN002, ANN003, ANN202
            enter(cat)
            try:
                return original(*a, **k)
            finally:
                leave()

        setattr(obj, attr, timed)

    for layer in rt.runner.model.layers:
        wrap(layer.attn.heads, "table", "routers")
        wrap(layer.attn, "project", "qkv")  # the QKV GEMM (with the router's columns where routed)
    comm = next(m.comm for m in rt.runner.model.modules() if hasattr(m, "comm"))  # the one tensor-parallel comm
    wrap(comm, "all_reduce", "all_reduce")
    graphs, rt.runner.graphs = rt.runner.graphs, None  # eager: the kernels can be told apart
    try:
        rt.runner.logits(step)
        sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            rt.runner.logits(step)
            sync(dev)
    finally:
        rt.runner.graphs = graphs
        for obj, attr, held in reversed(patched):
            if held is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, held)
        for h in handles:
            h.remove()
    # Each kernel is charged to the innermost annotated region open when it was launched (by
    # time on the launching thread: Triton launches are not children of the region's op).
    events = [e for e in prof.events() if str(getattr(e, "device_type", "CPU")).endswith("CPU")]
    regions = [(e.time_range.start, e.time_range.end, e.thread, e.name.split(":", 1)[1])
               for e in events if e.name.startswith("bd:")]
    parts: dict[str, float] = defaultdict(float)
    # Our Triton kernels, by name (their launches may not link to a CPU op the profiler records).
    for e in prof.events():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            cat = _triton_category(e.name)
            if cat is not None:
                parts[cat] += e.time_range.elapsed_us() / 1e3  # a device event's range is the kernel's run
    for e in events:
        if not e.kernels or e.name.startswith("bd:"):
            continue
        if all(_triton_category(k.name) is not None for k in e.kernels):
            continue  # counted above
        t = e.time_range.start
        inside = [r for r in regions if r[0] <= t <= r[1] and r[2] == e.thread]
        if inside:
            cat = min(inside, key=lambda r: r[1] - r[0])[3]  # the innermost
            parts[cat] += sum(k.duration for k in e.kernels if _triton_category(k.name) is None) / 1e3  # us -> ms
    result = {c: parts[c] for c in CATEGORIES if c not in ("sampling", "other")}
    result["sampling"] = sample_ms
    result["other"] = step_ms - sum(result.values())
    return result


# Our Triton kernels by the category of the module that launches them (tests check each name is
# a kernel in kernels/). The norms' kernel is left to "other", as the paper's breakdown leaves them.
_TRITON_KERNELS = {"_select_attention_kernel": "attention", "_rotary_store_kernel": "attention",
                   "_select_groups_kernel": "routers", "_gather_kernel": "mlp", "_gather_stream_kernel": "mlp",
                   "_split_k_epilogue_kernel": "mlp", "_silu_mul_kernel": "mlp"}


def _triton_category(kernel_name: str) -> str | None:
    return next((cat for name, cat in _TRITON_KERNELS.items() if kernel_name.startswith(name)), None)
