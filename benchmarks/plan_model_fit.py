"""Fit of the attention plan's cost model (kernels/attention_plan.py: IDLE_SHARE, IMBALANCE,
OVERFLOW_SLACK) against every measured cut: the plan sweeps (runs 47, 48, 52) and the grids
(run 40: the fixed 16-per-SM rule; run 51: the first wave rule, with the fixed counts 8 / 16 / 32
and the shortest chunks 128 / 512 beside it). No GPU: it re-plans each case on the host.

    PYTHONPATH=. python3 benchmarks/plan_model_fit.py

For a parameter setting, each case's cut is the one the model rates fastest among the rule's
candidates (1..5 waves' worth of programs); its time is the measured one with the same item count,
or, where that cut was never timed, the fixed rule's (so unmeasured choices count as no change).
Printed: the geometric mean of time / fixed rule's time over the cases, how many are > 3%
slower, how many choices were unmeasured; best settings first, then the committed one; then the
runtime's own cut (plan_attention, which also cuts finer where a step is under one wave), and
the fastest measured cut of each case (what any rule could reach on these cuts). Twice: on the
cuts timed at 3 programs per SM (runs 40-52) and on run 80's grid (2 stages, 4 per SM).
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

from benchmarks import kernel_grid as kg
from kernels.attention_plan import _wave_cost, plan_attention

AB = Path(__file__).parent / "results" / "nvidia-h200" / "ab"
SMS = 132
# Programs per SM of the builds these runs timed (3 stages at 128: 3 per SM; run 72 moved the
# runtime to 2 stages, 4 per SM, and the fit has not been re-run on cuts timed with it).
MEASURED_RESIDENT = {64: 6, 128: 3}
CURRENT_RESIDENT = {64: 6, 128: 4}  # the builds of run 80's grid (head dim 64: 3 stages, 128: 2 stages)
SWEEP_47 = [  # run 47's cases (head dim 128), in the script's order at the time
    ("l2-7b B8 2048 k16", 8, 32, [2048] * 8, 16), ("l2-7b B16 2048 k16", 16, 32, [2048] * 16, 16),
    ("l2-7b B16 2048 dense", 16, 32, [2048] * 16, 32), ("l2-7b B32 2048 k16", 32, 32, [2048] * 32, 16),
    ("l2-7b B32 2048 dense", 32, 32, [2048] * 32, 32), ("l3-8b B64 mixed k4", 64, 8, "mixed", 4),
    ("l3-8b B64 6144 k4", 64, 8, [6144] * 64, 4), ("gqa B32 4096 k4", 32, 8, [4096] * 32, 4),
    ("gqa B64 4096 k2", 64, 8, [4096] * 64, 2), ("gqa B64 spread k4", 64, 8, "spread", 4),
    ("mha32 B32 spread k6", 32, 32, "spread", 6),
]


def _consume(gen: torch.Generator, lens: list[int], hkv: int) -> None:
    """The draws the sweep script made after the lengths (block permutation, head table)."""
    torch.randperm(sum(-(-n // 16) for n in lens), generator=gen)
    for _ in lens:
        torch.randperm(hkv, generator=gen)


def _by_items(row: dict) -> dict[int, float]:
    times: dict[int, list[float]] = {}
    for key, us in row["us_in_graph"].items():
        times.setdefault(row["plans"][key]["items"], []).append(us)
    return {items: statistics.median(v) for items, v in times.items()}


def sweep_cases() -> list[tuple]:
    from benchmarks.plan_waves_ab import CASES, _lengths

    out = []
    rows47 = {r["case"]: r for r in json.loads((AB / "plan_waves_run47.json").read_text())["rows"]}
    gen = torch.Generator().manual_seed(0)
    for name, b, hkv, spec, k in SWEEP_47:
        lens = _lengths(spec, b, gen)
        _consume(gen, lens, hkv)
        row = rows47[name]
        out.append((f"r47 {name}", lens, k, 128, _by_items(row), row["us_in_graph"]["16/256"]))
    later = [json.loads((AB / f).read_text())["rows"] for f in ("plan_waves_run48.json", "plan_waves_run52.json")]
    gen = torch.Generator().manual_seed(0)
    for name, b, _, hkv, d, spec, k in CASES:
        lens = _lengths(spec, b, gen)
        _consume(gen, lens, hkv)
        run48, run52 = (next(r for r in rows if r["case"] == name) for rows in later)
        if d == 64:  # run 48 planned head dim 64 for 4 resident programs: its "wave" cut is not the rule's
            run48 = {**run48, "us_in_graph": {v: us for v, us in run48["us_in_graph"].items() if v != "wave"}}
        times = {**_by_items(run52), **_by_items(run48)}
        out.append((f"r48/52 {name}", lens, k, d, times, run48["us_in_graph"]["16/256"]))
    return out


def _key(r: dict) -> tuple:
    s = r["shape"]
    return (r["family"], s["name"], s["B"], s["lengths"], s["longest"], s["table_tokens"], r["dtype"],
            round(r["density"], 4))


def _timed_rows(path: Path) -> dict[tuple, list[dict]]:
    """A grid file's attention rows of the planner's variants (not SDPA, not other builds), by case."""
    timed: dict[tuple, list] = {}
    for r in json.loads(path.read_text())["rows"]:
        if r["op"] == "attention" and r["variant"] not in ("sdpa_dense", "persistent_grid"):
            timed.setdefault(_key(r), []).append(r)
    return timed


def _us_by_items(rows: list[dict]) -> dict[int, float]:
    times: dict[int, list[float]] = {}
    for r in rows:
        times.setdefault(r["plan"]["items"], []).append(r["ms_in_graph"] * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def _grid_keys():  # noqa: ANN202 - yields (key, lengths, k, head dim)
    """Every attention case of the grid (benchmarks/kernel_grid.py) with the lengths it drew."""
    for i, case in enumerate(kg.attention_cases()):
        if kg.skip_reason(case):
            continue
        lens = kg.lengths(case, torch.Generator().manual_seed(i))
        for k in kg.k_groups(case):
            yield ((case.family, case.heads.name, case.batch, case.dist, case.longest, case.table_tokens, case.dtype,
                    round(k / case.heads.hkv, 4)), lens, k, case.heads.d)


def grid_cases() -> list[tuple]:
    fixed = {k: r for k, rs in _timed_rows(AB / "grid_run40" / "kernels_grid.json").items() for r in rs
             if r["variant"] == "ours"}
    timed = _timed_rows(AB / "grid_run51" / "kernels_grid.json")
    # run 40 and run 51 ran on different machines: scale run 40's times by the ratio of same-cut rows
    scale = statistics.median(r["ms_in_graph"] / fixed[k]["ms_in_graph"] for k, rs in timed.items() for r in rs
                              if r["variant"] == "ours" and k in fixed
                              and r["plan"]["items"] == fixed[k]["plan"]["items"])
    out = []
    for key, lens, k, d in _grid_keys():
        if key not in timed or key not in fixed:
            continue
        old_items = fixed[key]["plan"]["items"]
        rows = timed[key] + ([] if any(r["plan"]["items"] == old_items for r in timed[key]) else
                             [{"plan": {"items": old_items}, "ms_in_graph": fixed[key]["ms_in_graph"] * scale}])
        by_items = _us_by_items(rows)
        out.append((f"grid {key}", lens, k, d, by_items, by_items[old_items]))
    return out


def current_grid_cases() -> list[tuple]:
    """The committed grid's attention rows (results/nvidia-h200/kernels_grid.json, run 80: the
    2-stage build, 4 programs per SM at head dim 128) where the fixed counts 8 / 16 / 32 per SM
    and the shortest chunks 128 / 512 were timed beside the rule: (name, lengths, k, head dim,
    us by item count, the 16-per-SM rule's us)."""
    timed = _timed_rows(AB.parent / "kernels_grid.json")
    out = []
    for key, lens, k, d in _grid_keys():
        rows = {r["variant"]: r for r in timed.get(key, [])}
        if "plan_pps16" in rows:
            out.append((f"grid80 {key}", lens, k, d, _us_by_items(list(rows.values())),
                        rows["plan_pps16"]["ms_in_graph"] * 1e3))
    return out


def candidates(lens: list[int], k: int, head_dim: int,
               resident: dict[int, int] = MEASURED_RESIDENT) -> tuple[bool, list[tuple[float, float, int]]]:
    """(equal lengths, [(programs per slot J, cv of piece sizes, items)] for the rule's 1..W waves)."""
    fl = np.asarray(lens, dtype=np.float64)
    slots = resident[head_dim] * SMS
    equal = bool(fl.min() == fl.max())
    out = []
    for w in range(1, max(1, 16 * SMS // slots) + 1):
        chunk = max(256, math.ceil(fl.sum() * k / (w * slots)))
        pieces = np.maximum(np.floor(fl / chunk + 0.5), 1.0)
        n = pieces.sum()
        mean, mean_sq = fl.sum() / n, (fl * fl / pieces).sum() / n
        cv = 0.0 if equal else math.sqrt(max(0.0, mean_sq / mean**2 - 1))
        out.append((n * k / slots, cv, plan_attention(lens, groups=k, num_sms=SMS, chunk_tokens=chunk).num_items))
    return equal, out


def cost(waves: float, cv: float, equal: bool, idle: float, imbalance: float, slack: float) -> float:
    """The planner's _wave_cost with these constants (equal pieces get no overflow slack, as there)."""
    return _wave_cost(waves, 1, cv, 0.0 if equal else slack, idle_share=idle, imbalance=imbalance)


def _summary(picked: list[tuple[float | None, float]]) -> tuple[float, int, int]:
    """(geometric mean of time / the fixed rule's, cases > 3% slower, picks never timed) over
    (the picked cut's us or None where it was never timed, the fixed rule's us); an untimed pick
    counts as the fixed rule's time."""
    logs = [math.log((t if t is not None else fixed) / fixed) for t, fixed in picked]
    slower = sum(t is not None and t > 1.03 * fixed for t, fixed in picked)
    return math.exp(statistics.mean(logs)), slower, sum(t is None for t, _ in picked)


def score(cases: list[tuple], idle: float, imbalance: float, slack: float) -> tuple[float, int, int]:
    picked = []
    for equal, cands, times, fixed_us in cases:
        costs = [cost(j, cv, equal, idle, imbalance, slack) for j, cv, _ in cands]
        picked.append((times.get(cands[costs.index(min(costs))][2]), fixed_us))
    return _summary(picked)


def runtime_score(cases: list[tuple], resident: dict[int, int]) -> tuple[float, int, int]:
    """score() of the runtime's own cut (plan_attention as committed, the sub-wave rule included)."""
    return _summary([(times.get(plan_attention(lens, groups=k, num_sms=SMS, resident=resident[d]).num_items), fixed)
                     for _, lens, k, d, times, fixed in cases])


def main() -> None:
    for title, cases, resident in (("3 per SM (runs 40-52)", sweep_cases() + grid_cases(), MEASURED_RESIDENT),
                                   ("4 per SM (run 80's grid)", current_grid_cases(), CURRENT_RESIDENT)):
        print(f"== {title}")
        fit([(*candidates(lens, k, d, resident), times, fixed) for _, lens, k, d, times, fixed in cases])
        print("the runtime's cut (the wave rule with the committed constants, finer under one wave): "
              + " ".join(str(round(x, 4)) for x in runtime_score(cases, resident)))


def fit(cases: list[tuple]) -> None:
    print(f"{len(cases)} cases")
    results = [(score(cases, *p), p) for p in itertools.product((0.3, 0.46, 0.6), (0.0, 0.25, 0.5, 1.0),
                                                                  (0.0, 0.02, 0.05))]
    results.sort()
    print("geo mean vs fixed rule, > 3% slower, unmeasured | IDLE_SHARE, IMBALANCE, OVERFLOW_SLACK")
    for (geo, slower, unmeasured), p in results[:10]:
        print(f"{geo:.4f} {slower:3d} {unmeasured:3d} | {p}")
    committed = (0.46, 1.0, 0.02)
    geo, slower, unmeasured = score(cases, *committed)
    print(f"committed {committed}: {geo:.4f} {slower} {unmeasured}")
    no_cv = (0.46, 0.0, 0.02)
    print(f"without the cv term {no_cv}: " + " ".join(str(round(x, 4)) for x in score(cases, *no_cv)))
    best = math.exp(statistics.mean(math.log(min(times.values()) / fixed) for _, _, times, fixed in cases))
    print(f"the fastest measured cut of each case: {best:.4f}")


if __name__ == "__main__":
    main()
