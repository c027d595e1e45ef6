"""The server's Prometheus metrics, written in the text exposition format (version 0.0.4).

    m = ServerMetrics()
    m.requests.inc(status="200")
    m.step_seconds.observe(0.012)
    text = m.render()                          # GET /metrics

Updated from two threads (the engine's and the event loop's), so every change takes one lock.
"""

from __future__ import annotations

import math
import threading

_LOCK = threading.Lock()

# Bucket bounds in seconds: a CPU step of a 135M model takes ~0.1 s, a GPU decode step ~10 ms.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with _LOCK:
            self._values[key] = self._values.get(key, 0.0) + amount

    def mirror(self, total: float) -> None:
        """Take the value of a count kept elsewhere (e.g. the scheduler's), which only grows."""
        with _LOCK:
            self._values[()] = float(total)

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def samples(self) -> list[str]:
        if not self._values:
            return [f"{self.name} 0"]
        return [f"{self.name}{_labels(dict(k))} {_number(v)}" for k, v in sorted(self._values.items())]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with _LOCK:
            self._values[tuple(sorted(labels.items()))] = float(value)


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help_text
        self.bounds = (*buckets, math.inf)
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with _LOCK:
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self.counts[i] += 1
                    break
            self.sum += value
            self.count += 1

    def samples(self) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {total}')
        return out + [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]


class ServerMetrics:
    """`replica` of `num_replicas` (each tp ranks) is which replica this server is, exported as
    polar_replica_info's labels, so that a scraper can tell the replicas apart."""

    def __init__(self, replica: int = 0, num_replicas: int = 1, tp: int = 1) -> None:
        p = "polar_"
        self.replica_info = Gauge(p + "replica_info", "which data-parallel replica this server is (always 1)")
        self.replica_info.set(1, replica=str(replica), replicas=str(num_replicas), tp=str(tp))
        self.requests = Counter(p + "requests_total", "HTTP requests to the API endpoints, by status code")
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "prompt tokens of the requests served")
        self.generation_tokens = Counter(p + "generation_tokens_total", "tokens generated")
        self.engine_requests = Counter(p + "engine_requests_total",
                                       "engine requests (a prompt x one of n choices) finished, by finish reason")
        self.preemptions = Counter(p + "preemptions_total",
                                   "sequences preempted to free KV blocks (recomputed when they resume)")
        self.queue_depth = Gauge(p + "queue_depth", "engine requests waiting for a batch slot")
        self.running = Gauge(p + "running_batch_size", "sequences in the running batch")
        self.in_flight = Gauge(p + "requests_in_flight", "API requests being answered")
        self.kv_blocks_used = Gauge(p + "kv_blocks_in_use", "KV-cache blocks held by sequences")
        self.kv_blocks_total = Gauge(p + "kv_blocks_total", "KV-cache blocks in all")
        self.attention_density = Gauge(p + "attention_density",
                                       "attention (KV group-layers) decode rows read, as a fraction of dense, since "
                                       "start; rate() of the two counters below gives it over a window")
        self.attention_group_reads = Counter(p + "attention_group_reads_total",
                                             "KV group-layers read by decode rows, over every rank")
        self.attention_group_reads_dense = Counter(p + "attention_group_reads_dense_total",
                                                   "KV group-layers dense decode would have read for the same rows")
        self.healthy = Gauge(p + "healthy", "1 while the server accepts requests, 0 while draining or dead")
        self.step_seconds = Histogram(p + "step_seconds", "time of one engine step", STEP_BUCKETS)
        self.ttft_seconds = Histogram(p + "time_to_first_token_seconds",
                                      "from a request's arrival to its first generated token", TTFT_BUCKETS)

    def render(self) -> str:
        lines: list[str] = []
        with _LOCK:
            for m in vars(self).values():
                lines += [f"# HELP {m.name} {m.help}", f"# TYPE {m.name} {m.kind}", *m.samples()]
        return "\n".join(lines) + "\n"
