"""The controller's Prometheus metrics, in a registry of its own (so that two controllers in one
process, as in the tests, never share a sample, and the process's default collectors stay out).

Counted as syncs end (`Metrics.record`):

- `kvmctl_syncs_total{project,result}`: reconciles, by result (synced, applied, partial,
  out-of-sync, failed, suspended).
- `kvmctl_sync_failures_total{project}`: reconciles that failed.
- `kvmctl_reconcile_duration_seconds{project}`: how long a reconcile took (suspended rounds,
  which reconcile nothing, are not observed).

Read from the projects' statuses at every scrape:

- `kvmctl_objects{project,sync_status}`: objects by sync status, every status present.
- `kvmctl_objects_health{project,health}`: objects by health, every health present.
- `kvmctl_drift_objects{project}`: objects OutOfSync.
- `kvmctl_last_successful_sync_timestamp_seconds{project}`: when a sync last ended without
  failing (absent until one has).
- `kvmctl_project_suspended{project}`: 1 while suspended.
- `kvmctl_host_up{project,host}`: 1 if the host could be read in the last round.
- `kvmctl_pending_restarts{project}`: VMs whose new definition waits for a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from ..sync.status import Health, ProjectStatus, SyncRecord, SyncResult, SyncStatus

log = logging.getLogger("kvmctl.controller")

# A reconcile reads every host and may create disks and boot VMs: seconds to many minutes, far
# beyond the client's default buckets (which end at 10 s).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1800.0)


def _families() -> dict[str, GaugeMetricFamily]:
    return {
        "objects": GaugeMetricFamily(
            "kvmctl_objects", "Objects of a project by sync status.",
            labels=["project", "sync_status"]),
        "health": GaugeMetricFamily(
            "kvmctl_objects_health", "Objects of a project by health.",
            labels=["project", "health"]),
        "drift": GaugeMetricFamily(
            "kvmctl_drift_objects", "Objects of a project that are OutOfSync.",
            labels=["project"]),
        "success": GaugeMetricFamily(
            "kvmctl_last_successful_sync_timestamp_seconds",
            "When a sync of the project last ended without failing, seconds since the epoch.",
            labels=["project"]),
        "suspended": GaugeMetricFamily(
            "kvmctl_project_suspended", "1 while the project is suspended.",
            labels=["project"]),
        "host": GaugeMetricFamily(
            "kvmctl_host_up", "1 if the host could be read in the project's last round.",
            labels=["project", "host"]),
        "restarts": GaugeMetricFamily(
            "kvmctl_pending_restarts", "VMs whose new definition waits for a restart.",
            labels=["project"]),
    }


class _StatusCollector:
    """Gauges computed from the statuses at scrape time, so they never lag the controller."""

    def __init__(self, projects: Callable[[], list[ProjectStatus]]) -> None:
        self._projects = projects

    def describe(self) -> Iterable[Metric]:
        # Describing (rather than collecting) at registration keeps the registry from calling
        # the controller before it runs, and still catches a name clash at once.
        return list(_families().values())

    def collect(self) -> Iterable[Metric]:
        families = _families()
        try:
            statuses = self._projects()
        except Exception:
            # A scrape must not fail because the controller could not answer: the counters
            # are still worth having, and the log says what went wrong.
            log.exception("metrics: cannot read the projects' statuses")
            statuses = []
        for p in statuses:
            for s in SyncStatus:
                families["objects"].add_metric([p.name, s.value], p.count(s))
            for h in Health:
                families["health"].add_metric([p.name, h.value], p.count(h))
            families["drift"].add_metric([p.name], p.count(SyncStatus.OUT_OF_SYNC))
            if p.last_success is not None:
                families["success"].add_metric([p.name], p.last_success)
            families["suspended"].add_metric([p.name], 1.0 if p.suspended else 0.0)
            for host in p.hosts:
                families["host"].add_metric([p.name, host.name], 1.0 if host.reachable else 0.0)
            families["restarts"].add_metric([p.name], len(p.pending_restarts))
        return list(families.values())


class Metrics:
    """The counters the loop feeds (`record`) and the gauges read from `projects()`."""

    def __init__(self, projects: Callable[[], list[ProjectStatus]]) -> None:
        self._registry = CollectorRegistry()
        self._syncs = Counter("kvmctl_syncs_total", "Reconciles of a project, by result.",
                              ["project", "result"], registry=self._registry)
        self._failures = Counter("kvmctl_sync_failures_total", "Reconciles that failed.",
                                 ["project"], registry=self._registry)
        self._duration = Histogram("kvmctl_reconcile_duration_seconds",
                                   "How long a reconcile of the project took.", ["project"],
                                   buckets=DURATION_BUCKETS, registry=self._registry)
        self._registry.register(_StatusCollector(projects))

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    def record(self, rec: SyncRecord) -> None:
        self._syncs.labels(project=rec.project, result=rec.result.value).inc()
        if rec.result is SyncResult.FAILED:
            self._failures.labels(project=rec.project).inc()
        else:
            # Present at zero from a project's first sync, so rate() and increase() see the
            # first failure as an increase rather than as a new series.
            self._failures.labels(project=rec.project)
        if rec.result is not SyncResult.SUSPENDED:
            self._duration.labels(project=rec.project).observe(max(0.0, rec.duration))
