"""The proxy's Prometheus metrics (prometheus-client), served on the loopback address the config
names (`metrics_address`, off when unset).

What a fleet watches: connections and bytes by agent and protocol, operations by decision, holds
waiting and the oldest one's age, recorder commit latency and queue, the policy generation, the
lockdown state, and the proxy process's own CPU and memory (prometheus-client's process
collector). Counters are bumped on the loop thread; the exposition runs on prometheus-client's
own HTTP thread, and the gauges it computes at scrape time only read."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Gauges that add up over proxy workers; every other gauge (ages, flags, the policy generation,
# process start time) takes the highest worker's value. Counters and histograms add up.
# (interlock_recorder_failures: each worker counts the failed states it entered; on a full disk
# every writing worker enters one, so the highest count is the instance's.)
SUMMED_GAUGES = {"interlock_holds_pending", "interlock_recorder_queue", "interlock_recorder_refused",
                 "process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds"}


class ProxyMetrics:
    def __init__(self) -> None:
        self.registry = reg = CollectorRegistry()
        self._closed: dict[tuple[str, str, str], tuple] = {}  # label values -> children, for the hot path
        ProcessCollector(registry=reg)  # process_cpu_seconds_total, process_resident_memory_bytes, …
        self.connections = Counter("interlock_connections_total", "Agent connections closed, by outcome",
                                   ["agent", "protocol", "outcome"], registry=reg)
        self.bytes = Counter("interlock_bytes_total", "Bytes relayed for agents (up: agent to service)",
                             ["agent", "protocol", "direction"], registry=reg)
        self._operation_children: dict[tuple[str, str, str], object] = {}
        self.operations = Counter("interlock_operations_total", "Operations judged, by decision",
                                  ["agent", "protocol", "decision"], registry=reg)
        self.commit_seconds = Histogram("interlock_recorder_commit_seconds", "Recorder group-commit latency",
                                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
                                        registry=reg)
        self.commit_rows = Counter("interlock_recorder_rows_total", "Rows the recorder committed", registry=reg)
        self.policy_generation = Gauge("interlock_policy_generation", "Policies loaded since the proxy started",
                                       registry=reg)
        self.policy_rules = Gauge("interlock_policy_rules", "Rules in the policy in force", registry=reg)
        self.holds_pending = Gauge("interlock_holds_pending", "Operations waiting for a human", registry=reg)
        self.hold_oldest = Gauge("interlock_hold_oldest_seconds", "Age of the oldest operation waiting for a human",
                                 registry=reg)
        self.recorder_queue = Gauge("interlock_recorder_queue", "Writes waiting for the next group commit",
                                    registry=reg)
        self.lockdown = Gauge("interlock_lockdown", "1 while the instance is locked down (tamper seen)", registry=reg)
        self.recorder_failed = Gauge("interlock_recorder_failed",
                                     "1 while the recorder cannot write (agent traffic is refused)", registry=reg)
        self.recorder_refused = Gauge("interlock_recorder_refused",
                                      "Connections and operations refused for want of a record since start",
                                      registry=reg)
        self.recorder_failures = Gauge("interlock_recorder_failures",
                                       "Times the recorder entered its failed state since start", registry=reg)

    def watch(self, holds_pending: Callable[[], float], hold_oldest: Callable[[], float],
              recorder_queue: Callable[[], float], lockdown_file: Path, recorder_health=None) -> None:
        """Gauges computed when scraped, from the proxy's own state (recorder_health: a
        recorder.store.Health, read only)."""
        if recorder_health is not None:
            self.recorder_failed.set_function(lambda: 1.0 if recorder_health.failed else 0.0)
            self.recorder_refused.set_function(lambda: float(recorder_health.refused))
            self.recorder_failures.set_function(lambda: float(recorder_health.failures))
        self.holds_pending.set_function(holds_pending)
        self.hold_oldest.set_function(hold_oldest)
        self.recorder_queue.set_function(recorder_queue)
        self.lockdown.set_function(lambda: 1.0 if lockdown_file.exists() else 0.0)

    def watch_spool(self, last: Callable[[], object]) -> None:
        """Shipping to the central recorder: `last()` is the proxy's latest reading of the spool
        (recorder.journal.Spool or None), taken once a second on its loop."""
        self.unshipped = Gauge("interlock_recorder_unshipped_records",
                               "Journal records not yet acknowledged by the central recorder", registry=self.registry)
        self.ship_lag = Gauge("interlock_recorder_ship_lag_seconds",
                              "Age of the oldest record not yet acknowledged by the central recorder",
                              registry=self.registry)
        self.unshipped.set_function(lambda: float(getattr(last(), "unshipped", 0)))
        self.ship_lag.set_function(lambda: float(getattr(last(), "lag", 0.0)))

    def policy_loaded(self, rules: int) -> None:
        self.policy_generation.inc()
        self.policy_rules.set(rules)

    def operation(self, agent: str, protocol: str, decision: str) -> None:
        key = (agent, protocol, decision)
        child = self._operation_children.get(key)
        if child is None:  # labels() takes a lock and builds its key each time: once per label set
            child = self._operation_children[key] = self.operations.labels(agent, protocol, decision)
        child.inc()

    def session_closed(self, agent: str, protocol: str, outcome: str, up: int, down: int) -> None:
        key = (agent, protocol, outcome)
        children = self._closed.get(key)
        if children is None:
            children = self._closed[key] = (self.connections.labels(agent, protocol, outcome),
                                            self.bytes.labels(agent, protocol, "up"),
                                            self.bytes.labels(agent, protocol, "down"))
        children[0].inc()
        if up:
            children[1].inc(up)
        if down:
            children[2].inc(down)

    def committed(self, seconds: float, rows: int) -> None:
        self.commit_seconds.observe(seconds)
        self.commit_rows.inc(rows)

    def serve(self, address: str, siblings: Callable[[], list[Path]] | None = None) -> None:
        """Expose /metrics on HOST:PORT (a loopback address: the data is the fleet's, not the agents').

        With several proxy workers, worker 0 serves them all: its own metrics merged with the
        other workers' last dumps (`dump`, once a second), listed by siblings()."""
        host, _, port = address.rpartition(":")
        registry = self.registry
        if siblings is not None:
            registry = CollectorRegistry()
            registry.register(_Merged(self.registry, siblings))
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)

    def dump(self, path: Path) -> None:
        """This worker's metrics, for worker 0 to merge (text exposition, replaced atomically)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(generate_latest(self.registry))
        os.replace(tmp, path)


class _Merged:
    """A collector: one registry's metrics plus other workers' dumps, added up per series."""

    def __init__(self, own: CollectorRegistry, siblings: Callable[[], list[Path]]):
        self.own, self.siblings = own, siblings

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple, float]] = {}

        def add(fam: Metric) -> None:
            if fam.name not in families:
                families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            highest = fam.type == "gauge" and fam.name not in SUMMED_GAUGES
            seen = values[fam.name]
            for sample in fam.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in seen:
                    seen[key] = sample.value
                elif highest or sample.name.endswith("_created") or sample.name == "process_start_time_seconds":
                    seen[key] = max(seen[key], sample.value)
                else:
                    seen[key] += sample.value

        for fam in self.own.collect():
            add(fam)
        for path in self.siblings():
            try:
                text = path.read_text()
            except OSError:
                continue  # that worker is (re)starting: its counters start again from zero
            for fam in text_string_to_metric_families(text):
                add(fam)
        for name, fam in families.items():
            for (sample, labels), value in values[name].items():
                fam.add_sample(sample, dict(labels), value)
            yield fam
