"""The few Prometheus metric kinds serve.py exports, written in the text exposition format by hand
(counters with labels, histograms, gauges): no client library for four metrics. Thread-safe: the
model thread and the event loop both record."""
import threading


def _labels(pairs):
    return "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else ""


def _number(value):
    return "+Inf" if value == float("inf") else repr(float(value)) if isinstance(value, float) else str(value)


class Counter:
    def __init__(self, name, help, label=None):
        self.name, self.help, self.label, self.values = name, help, label, {}
        self._lock = threading.Lock()

    def inc(self, label_value=None, by=1):
        with self._lock:
            self.values[label_value] = self.values.get(label_value, 0) + by

    def text(self):
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for value, count in sorted(self.values.items(), key=lambda kv: str(kv[0])):
                lines.append(f"{self.name}{_labels([(self.label, value)] if self.label else [])} {count}")
        return lines


class Histogram:
    def __init__(self, name, help, buckets):
        self.name, self.help, self.buckets = name, help, tuple(buckets) + (float("inf"),)
        self.counts, self.total, self.n = [0] * len(self.buckets), 0.0, 0
        self._lock = threading.Lock()

    def observe(self, value):
        with self._lock:
            for k, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[k] += 1
            self.total += value
            self.n += 1

    def text(self):
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for bound, count in zip(self.buckets, self.counts):  # cumulative, as the format wants
                lines.append(f"{self.name}_bucket{_labels([('le', _number(bound))])} {count}")
            lines += [f"{self.name}_sum {self.total!r}", f"{self.name}_count {self.n}"]
        return lines


class Gauge:
    def __init__(self, name, help, read):
        self.name, self.help, self.read = name, help, read

    def text(self):
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read()}"]


def exposition(metrics):
    return "\n".join(line for m in metrics for line in m.text()) + "\n"
