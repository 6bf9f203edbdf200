"""A tiny Prometheus registry: counters, gauges and histograms with label tuples, one render().

Written by hand (no client library at runtime) to the text exposition format 0.0.4:
https://prometheus.io/docs/instrumenting/exposition_formats/ . Updating a metric is a dict
operation on the request path; everything else (gauges read from live state, the process
collector) runs only when /metrics is scraped.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_left
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; request durations of a chat gateway run from milliseconds to minutes (long reasoning).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0)
MAX_LABEL_SETS = 500  # per metric: a client-chosen label value (a model name) cannot grow memory forever
OVERFLOW = "other"


def escape_label(value: str) -> str:
    """Label values escape backslash, double quote and line feed (format 0.0.4)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escapes backslash and line feed."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """Integers without a fraction, special values as Go's ParseFloat spells them."""
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Metric:
    """What every metric has: a name, help text, label names and one series per label tuple."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name = name
        self.help = help
        self.labels = labels
        self.series: dict[tuple[str, ...], object] = {}

    def _key(self, values: tuple[str, ...]) -> tuple[str, ...]:
        """The series key; past MAX_LABEL_SETS new label tuples all become ("other", ...)."""
        if values in self.series or len(self.series) < MAX_LABEL_SETS:
            return values
        return (OVERFLOW,) * len(values)

    def _labels(self, values: tuple[str, ...], extra: str = "") -> str:
        pairs = [f'{name}="{escape_label(value)}"' for name, value in zip(self.labels, values)]
        if extra:
            pairs.append(extra)
        return "{" + ",".join(pairs) + "}" if pairs else ""

    def samples(self) -> Iterable[str]:
        raise NotImplementedError

    def render(self) -> str:
        head = f"# HELP {self.name} {escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(Metric):
    """A value that only goes up; with `read`, it is read from live state at each scrape."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 read: Callable[[], dict[tuple[str, ...], float]] | None = None) -> None:
        super().__init__(name, help, labels)
        self.read = read

    def inc(self, values: tuple[str, ...] = (), amount: float = 1.0) -> None:
        key = self._key(values)
        self.series[key] = self.series.get(key, 0.0) + amount

    def samples(self) -> Iterable[str]:
        series = self.read() if self.read is not None else self.series
        for values, value in series.items():
            yield f"{self.name}{self._labels(values)} {format_value(value)}"


class Gauge(Counter):
    """A value that goes up and down; with `read`, it is read from live state at each scrape."""

    kind = "gauge"

    def set(self, values: tuple[str, ...], value: float) -> None:
        self.series[self._key(values)] = value


class Histogram(Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        super().__init__(name, help, labels)
        self.bounds = tuple(sorted(buckets))

    def observe(self, values: tuple[str, ...], value: float) -> None:
        key = self._key(values)
        state = self.series.get(key)
        if state is None:
            # One count per bucket (not cumulative: render() adds them up), then +Inf, sum.
            state = self.series[key] = [0] * (len(self.bounds) + 1) + [0.0]
        state[bisect_left(self.bounds, value)] += 1
        state[-1] += value

    def samples(self) -> Iterable[str]:
        les = [format_value(bound) for bound in self.bounds] + ["+Inf"]
        for values, state in self.series.items():
            running = 0
            for le, count in zip(les, state):
                running += count
                labels = self._labels(values, 'le="' + le + '"')
                yield f"{self.name}_bucket{labels} {running}"
            yield f"{self.name}_sum{self._labels(values)} {format_value(state[-1])}"
            yield f"{self.name}_count{self._labels(values)} {running}"


class Registry:
    """The metrics of one process, rendered in the order they were added."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []

    def add(self, metric: Metric) -> Metric:
        self.metrics.append(metric)
        return metric

    def counter(self, name: str, help: str, labels: tuple[str, ...] = (), read=None) -> Counter:
        return self.add(Counter(name, help, labels, read))

    def gauge(self, name: str, help: str, labels: tuple[str, ...] = (), read=None) -> Gauge:
        return self.add(Gauge(name, help, labels, read))

    def histogram(self, name: str, help: str, labels: tuple[str, ...] = (),
                  buckets: tuple[float, ...] = DURATION_BUCKETS) -> Histogram:
        return self.add(Histogram(name, help, labels, buckets))

    def render(self) -> bytes:
        return "".join(metric.render() for metric in self.metrics).encode()


# ---------------------------------------------------------------------------
# The process collector: the names and meanings of the official Python client's


def _process_stat() -> list[str]:
    """Fields of /proc/self/stat after the command name (which may hold spaces)."""
    with open("/proc/self/stat", "rb") as f:
        raw = f.read().decode()
    return raw[raw.rindex(")") + 2:].split()


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


def _max_fds() -> float:
    with open("/proc/self/limits", "rb") as f:
        for line in f:
            if line.startswith(b"Max open files"):
                soft = line.split()[3]
                return float("inf") if soft == b"unlimited" else float(soft)
    raise OSError("no open-files limit in /proc/self/limits")


def add_process_metrics(registry: Registry) -> None:
    """process_* gauges read from /proc at each scrape; absent where /proc is not (not Linux)."""
    if not os.path.exists("/proc/self/stat"):
        return
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGESIZE")
    start_time = _boot_time() + float(_process_stat()[19]) / ticks  # field 22: starttime
    max_fds = _max_fds()

    def stat(index: int, scale: float) -> Callable[[], dict]:
        return lambda: {(): float(_process_stat()[index]) * scale}

    def cpu() -> dict:
        fields = _process_stat()
        return {(): (float(fields[11]) + float(fields[12])) / ticks}  # utime + stime

    registry.counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", read=cpu)
    registry.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", read=stat(20, 1))
    registry.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", read=stat(21, page))
    registry.gauge("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                   read=lambda: {(): start_time})
    registry.gauge("process_open_fds", "Number of open file descriptors.",
                   read=lambda: {(): float(len(os.listdir("/proc/self/fd")))})
    registry.gauge("process_max_fds", "Maximum number of open file descriptors.", read=lambda: {(): max_fds})


# ---------------------------------------------------------------------------
# The gateway's own metrics


MAX_MODELS = 32  # distinct model labels; later names (clients choose them) count as "other"
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))


class GatewayMetrics:
    """The metrics the request path updates; gauges of live state are added by the app (`gauge`)."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter(
            "sambaproxy_requests_total", "Requests answered, by route, method and status "
            "(/healthz, /readyz, /metrics, /info, / and /favicon.ico are not counted).",
            ("route", "method", "status"))
        self.duration = r.histogram(
            "sambaproxy_request_duration_seconds",
            "Chat completion requests: seconds from the request to the end of the answer.", ("model", "stream"))
        self.ttft = r.histogram(
            "sambaproxy_time_to_first_token_seconds",
            "Chat completion requests: seconds from the request to the first answer event from upstream.",
            ("model", "stream"))
        self.prompt_tokens = r.counter("sambaproxy_prompt_tokens_total",
                                       "Prompt tokens upstream reported, by model.", ("model",))
        self.completion_tokens = r.counter("sambaproxy_completion_tokens_total",
                                           "Completion tokens upstream reported, by model.", ("model",))
        self.upstream_attempts = r.counter(
            "sambaproxy_upstream_attempts_total", "Upstream requests by route and outcome: ok, retried, "
            "relogin (401/403, then a new login), rejected, rate_limited, server_error, timeout, "
            "unreachable, client_error.", ("route", "outcome"))
        self._models: set[str] = set()

    def model_label(self, model: str) -> str:
        """The label of a client-chosen model name: the first MAX_MODELS names, then "other"."""
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS and len(model) <= 100:
            self._models.add(model)
            return model
        return OVERFLOW

    def gauge(self, name: str, help: str, labels: tuple[str, ...], read) -> Gauge:
        return self.registry.gauge(name, help, labels, read)

    def counter(self, name: str, help: str, labels: tuple[str, ...], read) -> Counter:
        return self.registry.counter(name, help, labels, read)

    def render(self) -> bytes:
        return self.registry.render()
