"""metrics.py on plain values, and the strict exposition checker (tests/prom_check.py) itself."""

from __future__ import annotations

import os
import time

import pytest

import metrics
from prom_check import parse


def test_registry_renders_a_valid_exposition_with_escaped_labels_and_cumulative_buckets():
    registry = metrics.Registry()
    counter = registry.counter("demo_requests_total", "Requests.\nSecond line \\ backslash", ("path",))
    counter.inc(('/a"b\\c\nd',))
    counter.inc(('/a"b\\c\nd',), 2)
    registry.gauge("demo_live", "Read at scrape time.", ("kind",), lambda: {("x",): 1.5})
    histogram = registry.histogram("demo_seconds", "Durations.", ("model",), buckets=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(("m",), value)
    text = registry.render().decode()
    exposition = parse(text)
    assert exposition.types == {"demo_requests_total": "counter", "demo_live": "gauge",
                                "demo_seconds": "histogram"}
    assert exposition.value("demo_requests_total", path='/a"b\\c\nd') == 3
    assert exposition.value("demo_live", kind="x") == 1.5
    buckets = [exposition.value("demo_seconds_bucket", model="m", le=le) for le in ("0.1", "1", "+Inf")]
    assert buckets == [2, 3, 4]  # le is inclusive: 0.1 falls in the 0.1 bucket
    assert exposition.value("demo_seconds_count", model="m") == 4
    assert exposition.value("demo_seconds_sum", model="m") == pytest.approx(3.65)
    assert "\\n" in text  # the line feed travels escaped, never raw


def test_label_sets_are_bounded_per_metric(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_LABEL_SETS", 3)
    counter = metrics.Counter("c_total", "c", ("model",))
    for name in ("a", "b", "c", "d", "e", "a"):
        counter.inc((name,))
    assert counter.series == {("a",): 2, ("b",): 1, ("c",): 1, ("other",): 2}


def test_model_labels_keep_the_first_names_then_other(monkeypatch):
    monkeypatch.setattr(metrics, "MAX_MODELS", 2)
    gateway = metrics.GatewayMetrics()
    assert [gateway.model_label(m) for m in ("A", "B", "C", "A", "x" * 101)] == ["A", "B", "other", "A", "other"]


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="the process collector reads /proc (Linux)")
def test_process_metrics_come_from_proc():
    registry = metrics.Registry()
    metrics.add_process_metrics(registry)
    exposition = parse(registry.render().decode())
    assert exposition.value("process_resident_memory_bytes") > 1_000_000
    # listdir holds one fd of its own while it runs: the two counts differ by at most that one
    assert abs(exposition.value("process_open_fds") - len(os.listdir("/proc/self/fd"))) <= 1
    start = exposition.value("process_start_time_seconds")
    assert time.time() - 86400 * 30 < start <= time.time()
    assert exposition.value("process_cpu_seconds_total") > 0
    assert exposition.types["process_cpu_seconds_total"] == "counter"


@pytest.mark.parametrize("value, text", [(3.0, "3"), (0.25, "0.25"), (float("inf"), "+Inf"),
                                         (float("nan"), "NaN"), (-2.0, "-2")])
def test_values_are_formatted_as_prometheus_reads_them(value, text):
    assert metrics.format_value(value) == text


GOOD = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 1\n"

BAD = [
    pytest.param("# TYPE a_total counter\na_total 1", "end with a line feed", id="no-final-newline"),
    pytest.param("1abc 3\n", "bad metric name", id="bad-name"),
    pytest.param('a{x="\\t"} 1\n', "bad escape", id="bad-label-escape"),
    pytest.param('a{__x="1"} 1\n', "reserved label", id="reserved-label"),
    pytest.param('a{x="1",x="2"} 1\n', "twice", id="repeated-label"),
    pytest.param('a{x="1} 1\n', "unterminated", id="unterminated-value"),
    pytest.param("a 1\na 2\n", "duplicate series", id="duplicate-series"),
    pytest.param("a 1\n# TYPE a gauge\n", "after its samples", id="type-after-samples"),
    pytest.param("# TYPE a gauge\n# TYPE a gauge\n", "TYPE", id="type-twice"),
    pytest.param("# TYPE a sideways\na 1\n", "bad type", id="unknown-type"),
    pytest.param("a 1\nb 1\na{y=\"2\"} 1\n", "not together", id="interleaved-families"),
    pytest.param("a one\n", "bad value", id="bad-value"),
    pytest.param("a 1 2 3\n", "optional timestamp", id="extra-field"),
    pytest.param("a 1\n\nb 1\n", "empty line", id="empty-line"),
    pytest.param("# TYPE c_total counter\nc_total -1\n", "counter", id="negative-counter"),
    pytest.param("# HELP a bad \\t escape\n", "bad escape in HELP", id="bad-help-escape"),
    pytest.param('# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n',
                 "not cumulative", id="histogram-not-cumulative"),
    pytest.param('# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', "+Inf",
                 id="histogram-without-inf"),
    pytest.param('# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n', "_count",
                 id="histogram-count-mismatch"),
    pytest.param('# TYPE h histogram\nh_bucket{le="+Inf"} 1\nh_count 1\n', "_sum", id="histogram-without-sum"),
]


def test_checker_accepts_a_valid_exposition():
    assert parse(GOOD).value("a_total", x="1") == 1


@pytest.mark.parametrize("text, problem", BAD)
def test_checker_rejects_each_grammar_violation(text, problem):
    with pytest.raises(ValueError, match=problem.replace("+", r"\+")):
        parse(text)
