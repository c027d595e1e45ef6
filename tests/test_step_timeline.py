"""The decode step's timeline summary (benchmarks/step_timeline.py): busy time is the union of
kernel intervals, gaps are the span not covered, and overlapping kernels (programmatic
dependent launch) are neither double-counted nor counted as gaps."""

from benchmarks.step_timeline import intervals_summary, short_name


def test_gaps_and_busy_time_of_sequential_and_overlapping_kernels() -> None:
    spans = [(20.0, 30.0, "b"), (0.0, 10.0, "a"), (28.0, 40.0, "c"), (45.0, 50.0, "a")]  # us, any order
    s = intervals_summary(spans)
    assert s["kernels"] == 4
    assert s["span_ms"] == 50.0 / 1e3
    assert s["busy_ms"] == (10 + 10 + 10 + 5) / 1e3  # c overlaps b by 2 us: counted once
    assert s["gap_ms"] == (10 + 5) / 1e3  # before b, before the second a
    assert abs(s["busy_ms"] + s["gap_ms"] - s["span_ms"]) < 1e-12
    by = {k["name"]: k for k in s["by_kernel"]}
    assert by["a"]["launches"] == 2 and by["a"]["ms"] == 15 / 1e3 and by["a"]["gap_before_ms"] == 5 / 1e3
    assert by["c"]["gap_before_ms"] == 0.0 and by["c"]["ms"] == 12 / 1e3
    assert intervals_summary([])["kernels"] == 0


def test_kernel_names_lose_their_templates_and_arguments() -> None:
    assert short_name("void cutlass::Kernel<foo, bar>(int)") == "void cutlass::Kernel"
    assert short_name("_select_attention_kernel") == "_select_attention_kernel"
    assert len(short_name("x" * 100)) == 60
