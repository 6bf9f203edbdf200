"""A strict checker of the Prometheus text exposition format 0.0.4, for the /metrics tests.

https://prometheus.io/docs/instrumenting/exposition_formats/ : HELP and TYPE at most once per
family and before its samples, a family's samples together, names and label names by the
grammar, label values with only the three escapes, values as Go's ParseFloat reads them, no
duplicate series; histograms with cumulative buckets ending at +Inf, `_count` equal to that
bucket and a `_sum`; counters never negative. `parse` returns the samples or raises ValueError
naming the line.
"""

from __future__ import annotations

import math
import re

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
VALUE = re.compile(r"[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
TIMESTAMP = re.compile(r"-?\d+")
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}

Labels = tuple[tuple[str, str], ...]


class Exposition:
    """What a valid exposition holds: family types and help, and every sample by (name, labels)."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.help: dict[str, str] = {}
        self.samples: dict[tuple[str, Labels], float] = {}

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def _labels(text: str, where: str) -> tuple[Labels, str]:
    """Parse `{a="b",...}` at the start of text; return the labels and the rest of the line."""
    pos, labels = 1, []
    while True:
        if text[pos:pos + 1] == "}":
            pos += 1
            break
        match = LABEL_NAME.match(text, pos)
        if not match:
            raise ValueError(f"{where}: bad label name at {text[pos:pos + 20]!r}")
        name = match.group()
        if name.startswith("__"):
            raise ValueError(f"{where}: reserved label name {name}")
        pos = match.end()
        if text[pos:pos + 2] != '="':
            raise ValueError(f'{where}: expected =" after label {name}')
        pos += 2
        value = []
        while True:
            if pos >= len(text):
                raise ValueError(f"{where}: unterminated label value")
            ch = text[pos]
            if ch == "\\":
                escaped = text[pos + 1:pos + 2]
                if escaped not in ("\\", '"', "n"):
                    raise ValueError(f"{where}: bad escape \\{escaped} in a label value")
                value.append("\n" if escaped == "n" else escaped)
                pos += 2
            elif ch == '"':
                pos += 1
                break
            elif ch == "\n":
                raise ValueError(f"{where}: raw line feed in a label value")
            else:
                value.append(ch)
                pos += 1
        if name in dict(labels):
            raise ValueError(f"{where}: label {name} twice")
        labels.append((name, "".join(value)))
        if text[pos:pos + 1] == ",":
            pos += 1
        elif text[pos:pos + 1] != "}":
            raise ValueError(f"{where}: expected , or }} after label {name}")
    return tuple(sorted(labels)), text[pos:]


def _float(text: str, where: str) -> float:
    if not VALUE.fullmatch(text):
        raise ValueError(f"{where}: bad value {text!r}")
    return float(text)


def _family(name: str, types: dict[str, str]) -> str:
    """The family a sample name belongs to (histogram and summary samples carry suffixes)."""
    for family, kind in types.items():
        for suffix in SUFFIXES.get(kind, ("",)):
            if name == family + suffix:
                return family
    return name


def parse(text: str) -> Exposition:
    """Parse and check an exposition; raise ValueError naming the first problem."""
    if text and not text.endswith("\n"):
        raise ValueError("the exposition must end with a line feed")
    out = Exposition()
    done: set[str] = set()  # families whose samples have ended
    sampled: set[str] = set()  # families with samples
    current = None
    for number, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {number}"
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                kind, name = parts[1], parts[2]
                if not NAME.fullmatch(name):
                    raise ValueError(f"{where}: bad metric name {name!r}")
                if name in done or name in sampled:
                    raise ValueError(f"{where}: {kind} for {name} after its samples")
                if kind == "TYPE":
                    if len(parts) != 4 or parts[3] not in TYPES:
                        raise ValueError(f"{where}: bad type line")
                    if name in out.types:
                        raise ValueError(f"{where}: second TYPE for {name}")
                    out.types[name] = parts[3]
                else:
                    if name in out.help:
                        raise ValueError(f"{where}: second HELP for {name}")
                    help_text = parts[3] if len(parts) == 4 else ""
                    if re.search(r"\\(?!n)", help_text.replace("\\\\", "")):
                        raise ValueError(f"{where}: bad escape in HELP")
                    out.help[name] = help_text
                if current is not None and current != name:
                    done.add(current)
                current = name
            continue
        if not line.strip():
            raise ValueError(f"{where}: empty line")
        match = NAME.match(line)
        if not match:
            raise ValueError(f"{where}: bad metric name")
        name, rest = match.group(), line[match.end():]
        labels: Labels = ()
        if rest.startswith("{"):
            labels, rest = _labels(rest, where)
        if not rest.startswith(" "):
            raise ValueError(f"{where}: expected a space before the value")
        fields = rest[1:].split(" ")
        if len(fields) not in (1, 2) or (len(fields) == 2 and not TIMESTAMP.fullmatch(fields[1])):
            raise ValueError(f"{where}: expected a value and an optional timestamp")
        value = _float(fields[0], where)
        family = _family(name, out.types)
        if family in done:
            raise ValueError(f"{where}: samples of {family} are not together")
        if current is not None and current != family:
            done.add(current)
        current = family
        sampled.add(family)
        if (name, labels) in out.samples:
            raise ValueError(f"{where}: duplicate series {name}{dict(labels)}")
        if out.types.get(family) == "counter" and (value < 0 or math.isnan(value)):
            raise ValueError(f"{where}: counter {name} is {value}")
        out.samples[(name, labels)] = value
    for family, kind in out.types.items():
        if kind == "histogram":
            _check_histogram(out, family)
    return out


def _check_histogram(out: Exposition, family: str) -> None:
    """Buckets per series: a numeric le, cumulative, the last +Inf, equal to _count; a _sum."""
    groups: dict[Labels, list[tuple[float, float]]] = {}
    for (name, labels), value in out.samples.items():
        if name == family + "_bucket":
            le = dict(labels).get("le")
            if le is None:
                raise ValueError(f"{family}_bucket without le")
            rest = tuple(pair for pair in labels if pair[0] != "le")
            groups.setdefault(rest, []).append((float(le), value))
    for labels, buckets in groups.items():
        buckets.sort()
        counts = [count for _, count in buckets]
        if counts != sorted(counts):
            raise ValueError(f"{family}{dict(labels)}: buckets are not cumulative")
        if buckets[-1][0] != math.inf:
            raise ValueError(f"{family}{dict(labels)}: no +Inf bucket")
        if out.samples.get((family + "_count", labels)) != buckets[-1][1]:
            raise ValueError(f"{family}{dict(labels)}: _count differs from the +Inf bucket")
        if (family + "_sum", labels) not in out.samples:
            raise ValueError(f"{family}{dict(labels)}: no _sum")
