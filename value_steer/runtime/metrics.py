"""Prometheus export of the steering engine's counters. No vLLM here.

The counters live in the worker process (``SteeringState.counters``); ``/metrics`` is served by the API
process. The server adapter pulls a snapshot over RPC when ``/metrics`` is scraped and hands it to
:class:`SteeringCollector`, which renders it as Prometheus counter families in the API process's
registry, so a scrape always reports the engine's current totals.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

# name -> help. Keys are the fields of ``value_steer.runtime.state.SteeringCounters``.
COUNTERS: dict[str, str] = {
    "requests_steered": "Requests registered with steering on (any mode).",
    "tokens_scored": "Decode tokens whose hidden state was scored by the value head.",
    "interventions": "Tokens where steering intervened (VFD replaced the sample, or abstention forced EOS).",
    "forced_eos": "Requests ended by dynamic abstention.",
    "requests_refused": "Requests the worker refused (invalid steering arguments, or VFD cannot filter them): "
    "ended at once with no text.",
}


class SteeringCollector:
    """A ``prometheus_client`` collector over the last counter snapshot pulled from the workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._scrape_errors = 0

    def update(self, counters: Mapping[str, Any]) -> None:
        """Replace the snapshot (``SteeringCounters`` as a dict)."""
        with self._lock:
            self._snapshot = dict(counters)

    def record_error(self) -> None:
        with self._lock:
            self._scrape_errors += 1

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        with self._lock:
            snap, errors = dict(self._snapshot), self._scrape_errors
        for key, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"value_steer_{key}", help_text, value=float(snap.get(key, 0)))
        by_mode = CounterMetricFamily("value_steer_requests_by_mode", "Steered requests by mode.", labels=["mode"])
        for mode, n in sorted((snap.get("by_mode") or {}).items()):
            by_mode.add_metric([mode], float(n))
        yield by_mode
        yield CounterMetricFamily("value_steer_stats_rpc_errors", "Failed pulls of the worker counters at scrape time.",
                                  value=float(errors))


_COLLECTOR: SteeringCollector | None = None


def steering_collector() -> SteeringCollector:
    """The process's collector, registered once in ``prometheus_client.REGISTRY``."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        collector = SteeringCollector()
        REGISTRY.register(collector)
        _COLLECTOR = collector
    return _COLLECTOR


def render(collector: SteeringCollector) -> str:
    """Text exposition of one collector (tests and debugging)."""
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    reg.register(collector)
    return generate_latest(reg).decode()
