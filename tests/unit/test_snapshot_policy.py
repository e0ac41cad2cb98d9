"""Snapshot policies (a VM's spec.snapshots), decided from data: which snapshot a run takes, and
which of the policy's own snapshots expire (sync/snapshots.decide and due). No libvirt here."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pytest

from kvmctl.host.state import LiveSnapshot
from kvmctl.kinds import SnapshotOrigin
from kvmctl.manifest.model import SnapshotPolicy
from kvmctl.sync.snapshots import Decision, decide, due, policy_snapshots

PROJECT = "lab"
VM = "web"
HOUR = 3600
DAY = 86400
NOW = dt.datetime(2026, 3, 10, 12, 0, 0, tzinfo=dt.UTC)


def policy(**fields: object) -> SnapshotPolicy:
    base = SnapshotPolicy(every_s=HOUR, schedule=None, timezone="UTC", keep=None,
                          keep_for_s=None, name="{vm}-auto-%Y%m%d-%H%M%S", when_stopped=False)
    return replace(base, **fields)  # type: ignore[arg-type]


def snap(name: str, created: dt.datetime | float, project: str | None = PROJECT,
         origin: SnapshotOrigin | None = SnapshotOrigin.POLICY) -> LiveSnapshot:
    when = created.timestamp() if isinstance(created, dt.datetime) else created
    return LiveSnapshot(VM, name, int(when), "running", None, "", project, origin, "", True,
                        False, False)


def run(p: SnapshotPolicy, taken: list[LiveSnapshot], now: dt.datetime = NOW,
        running: bool = True, declared: frozenset[str] = frozenset(),
        ignore_schedule: bool = False) -> Decision:
    return decide(p, VM, running, taken, PROJECT, declared, now, ignore_schedule)


def ago(seconds: float, now: dt.datetime = NOW) -> dt.datetime:
    return now - dt.timedelta(seconds=seconds)


def simulate(p: SnapshotPolicy, runs: int, start: dt.datetime, step_s: float,
             taken: list[LiveSnapshot] | None = None
             ) -> tuple[list[LiveSnapshot], list[Decision]]:
    """Run the policy `runs` times, `step_s` apart, applying each decision to the host's list."""
    host = list(taken or [])
    decisions = []
    for i in range(runs):
        now = start + dt.timedelta(seconds=i * step_s)
        d = run(p, host, now)
        decisions.append(d)
        if d.take:
            host.append(snap(d.take, now))
        host = [s for s in host if s.name not in d.remove]
    return host, decisions


# ---- keep: N -------------------------------------------------------------------------------------

def test_keep_3_run_five_times_keeps_exactly_the_newest_three() -> None:
    start = dt.datetime(2026, 3, 10, 0, 0, 0, tzinfo=dt.UTC)
    host, decisions = simulate(policy(keep=3), 5, start, HOUR)
    assert all(d.take for d in decisions), decisions
    taken = [d.take for d in decisions]
    assert len(set(taken)) == 5
    assert [s.name for s in host] == taken[2:]
    assert taken[2:] == ["web-auto-20260310-020000", "web-auto-20260310-030000",
                         "web-auto-20260310-040000"]
    # nothing goes before there are more than three; then one per run, the oldest
    assert [d.remove for d in decisions] == [(), (), (), (taken[0],), (taken[1],)]


def test_keep_removes_oldest_first_when_several_expire_at_once() -> None:
    mine = [snap(f"p{i}", ago((6 - i) * HOUR)) for i in range(6)]  # p0 oldest
    d = run(policy(keep=2), list(reversed(mine)))  # the host's order does not matter
    assert d.take is not None
    assert d.remove == ("p0", "p1", "p2", "p3", "p4")


def test_keep_1_never_removes_the_snapshot_just_taken() -> None:
    d = run(policy(keep=1), [snap("old", ago(2 * HOUR))])
    assert d.take is not None and d.take not in d.remove
    assert d.remove == ("old",)


def test_keep_counts_the_one_taken_now() -> None:
    d = run(policy(keep=3), [snap("a", ago(3 * HOUR)), snap("b", ago(2 * HOUR)),
                             snap("c", ago(HOUR))])
    assert d.take is not None and d.remove == ("a",)


def test_keep_without_a_take_keeps_exactly_n() -> None:
    mine = [snap(f"s{i}", ago((5 - i) * 60)) for i in range(5)]  # newest 1 min old
    d = run(policy(keep=3), mine)
    assert d.take is None and d.why == "not due yet"
    assert d.remove == ("s0", "s1")


# ---- keepFor -------------------------------------------------------------------------------------

def test_keep_for_removes_the_ones_older_than_it() -> None:
    taken = [snap("9d", ago(9 * DAY)), snap("8d", ago(8 * DAY)), snap("6d", ago(6 * DAY)),
             snap("1h", ago(HOUR))]
    d = run(policy(keep_for_s=7 * DAY), taken)
    assert d.remove == ("9d", "8d")
    assert d.take is not None  # the newest is an hour old: every 1h is due


def test_keep_for_keeps_a_snapshot_exactly_that_old() -> None:
    d = run(policy(keep_for_s=7 * DAY), [snap("edge", ago(7 * DAY))])
    assert d.remove == ()


def test_keep_for_never_removes_the_one_just_taken() -> None:
    d = run(policy(keep_for_s=60), [])
    assert d.take is not None and d.remove == ()


def test_keep_and_keep_for_together_remove_the_union_oldest_first() -> None:
    taken = [snap("a", ago(10 * DAY)), snap("b", ago(5 * DAY)), snap("c", ago(4 * DAY)),
             snap("d", ago(3 * DAY)), snap("e", ago(2 * HOUR))]
    # keepFor 7d: a; keep 3 (with the new one): a, b, c
    d = run(policy(keep=3, keep_for_s=7 * DAY), taken)
    assert d.take is not None
    assert d.remove == ("a", "b", "c")
    # keepFor stricter than keep: 3d removes a, b, c, d even though keep would allow e + d
    d = run(policy(keep=10, keep_for_s=3 * DAY - 1), taken)
    assert d.remove == ("a", "b", "c", "d")


def test_retention_alone_removes_nothing_without_limits() -> None:
    taken = [snap(f"s{i}", ago(i * DAY)) for i in range(1, 40)]
    assert run(policy(), taken).remove == ()


# ---- every ---------------------------------------------------------------------------------------

def test_every_is_not_due_before_the_interval() -> None:
    p = policy(every_s=6 * HOUR)
    assert due(p, snap("s", ago(6 * HOUR - 1)), NOW) is None
    d = run(p, [snap("s", ago(5 * HOUR))])
    assert d.take is None and d.why == "not due yet"


def test_every_is_due_at_and_after_the_interval() -> None:
    p = policy(every_s=6 * HOUR)
    at = due(p, snap("s", ago(6 * HOUR)), NOW)
    assert at is not None and "6h" in at
    assert due(p, snap("s", ago(30 * HOUR)), NOW) is not None
    assert run(p, [snap("s", ago(7 * HOUR))]).take is not None


def test_with_no_snapshot_yet_a_policy_is_due() -> None:
    assert due(policy(every_s=DAY), None, NOW) == "the policy has no snapshot yet"
    assert due(policy(every_s=None, schedule="0 3 1 1 *"), None, NOW) is not None
    assert run(policy(every_s=30 * DAY), []).take is not None


def test_every_counts_from_the_newest_policy_snapshot_not_from_others() -> None:
    """A manual snapshot taken a minute ago does not reset the policy's clock."""
    taken = [snap("policy-old", ago(2 * HOUR)),
             snap("by-hand", ago(60), origin=SnapshotOrigin.MANUAL),
             snap("declared-one", ago(60), origin=SnapshotOrigin.DECLARED),
             snap("theirs", ago(60), project="other")]
    assert run(policy(every_s=HOUR), taken).take is not None


# ---- schedule (cron) -----------------------------------------------------------------------------

def _utc(hour: int, minute: int = 0, day: int = 10) -> dt.datetime:
    return dt.datetime(2026, 3, day, hour, minute, tzinfo=dt.UTC)


def test_schedule_is_due_when_it_fired_since_the_newest() -> None:
    p = policy(every_s=None, schedule="0 3 * * *")
    why = due(p, snap("s", _utc(2)), _utc(3, 30))
    assert why is not None and "0 3 * * *" in why
    assert run(p, [snap("s", _utc(2))], now=_utc(3, 30)).take is not None


def test_schedule_is_not_due_when_the_newest_is_after_the_firing() -> None:
    p = policy(every_s=None, schedule="0 3 * * *")
    assert due(p, snap("s", _utc(3, 10)), _utc(3, 30)) is None
    # and the next day, once it fired again
    assert due(p, snap("s", _utc(3, 10)), _utc(3, 0, day=11)) is not None


def test_schedule_is_not_due_before_its_time_even_when_long_since_the_newest() -> None:
    p = policy(every_s=None, schedule="0 3 * * *")
    # newest yesterday at 03:05; today's 03:00 has not come yet at 02:59
    assert due(p, snap("s", _utc(3, 5, day=9)), _utc(2, 59)) is None


def test_schedule_fires_in_its_timezone() -> None:
    """03:00 in Berlin (UTC+1 in March before the change) is 02:00 UTC."""
    berlin = policy(every_s=None, schedule="0 3 * * *", timezone="Europe/Berlin")
    utc = policy(every_s=None, schedule="0 3 * * *", timezone="UTC")
    newest, now = snap("s", _utc(1)), _utc(2, 30)  # 02:00 and 03:30 Berlin
    assert due(berlin, newest, now) is not None
    assert due(utc, newest, now) is None
    later = snap("s", _utc(2, 10))  # 03:10 Berlin: after the firing
    assert due(berlin, later, now) is None


def test_a_snapshot_taken_exactly_at_the_firing_counts_for_it() -> None:
    p = policy(every_s=None, schedule="0 3 * * *")
    assert due(p, snap("s", _utc(3)), _utc(3, 30)) is None


# ---- whenStopped ---------------------------------------------------------------------------------

def test_a_stopped_vm_is_skipped_without_when_stopped_but_retention_applies() -> None:
    taken = [snap("a", ago(5 * HOUR)), snap("b", ago(4 * HOUR)), snap("c", ago(3 * HOUR))]
    d = run(policy(keep=2), taken, running=False)
    assert d.take is None
    assert "stopped" in d.why and "whenStopped" in d.why
    assert d.remove == ("a",)


def test_a_stopped_vm_is_skipped_even_with_ignore_schedule_when_when_stopped_is_false() -> None:
    d = run(policy(), [], running=False, ignore_schedule=True)
    assert d.take is None


def test_when_stopped_true_takes_a_stopped_vm() -> None:
    d = run(policy(when_stopped=True, keep=2), [snap("a", ago(5 * HOUR)),
                                                snap("b", ago(4 * HOUR))], running=False)
    assert d.take is not None
    assert d.remove == ("a",)


def test_when_stopped_true_still_waits_for_the_interval() -> None:
    d = run(policy(when_stopped=True), [snap("a", ago(60))], running=False)
    assert d.take is None


# ---- ownership: only this project's policy snapshots count and are ever removed ---------------

def test_only_this_projects_policy_snapshots_are_ever_removed() -> None:
    old = ago(400 * DAY)
    others = [
        snap("declared-by-doc", old),  # a policy mark, but a Snapshot document declares the name
        snap("a-declared-one", old, origin=SnapshotOrigin.DECLARED),
        snap("by-hand", old, origin=SnapshotOrigin.MANUAL),
        snap("other-project", old, project="other"),
        snap("unmarked", old, project=None, origin=None),
    ]
    mine = [snap(f"mine{i}", ago((5 - i) * HOUR)) for i in range(5)]
    d = run(policy(keep=1, keep_for_s=DAY), others + mine,
            declared=frozenset({"declared-by-doc"}))
    assert d.take is not None
    assert d.remove == ("mine0", "mine1", "mine2", "mine3", "mine4")
    assert not set(d.remove) & {s.name for s in others}


def test_foreign_snapshots_do_not_count_toward_keep() -> None:
    foreign = [snap(f"hand{i}", ago(i * HOUR + 100), origin=SnapshotOrigin.MANUAL)
               for i in range(1, 6)]
    d = run(policy(keep=2), foreign + [snap("mine", ago(2 * HOUR))])
    assert d.take is not None
    assert d.remove == ()  # two of the policy's: mine and the new one


def test_policy_snapshots_lists_only_this_projects_policy_ones_oldest_first() -> None:
    taken = [snap("b", 200), snap("a", 100), snap("c", 100),
             snap("m", 50, origin=SnapshotOrigin.MANUAL), snap("x", 10, project="other"),
             snap("d", 5)]
    got = policy_snapshots(taken, PROJECT, frozenset({"d"}))
    assert [s.name for s in got] == ["a", "c", "b"]


# ---- names ---------------------------------------------------------------------------------------

def test_the_name_fills_in_the_vm_and_the_time() -> None:
    d = run(policy(name="{vm}-nightly-%Y%m%d-%H%M"), [])
    assert d.take == "web-nightly-20260310-1200"


def test_the_name_uses_the_policys_timezone() -> None:
    late = dt.datetime(2026, 1, 15, 23, 30, tzinfo=dt.UTC)  # 00:30 on the 16th in Berlin
    berlin = policy(name="{vm}-%Y%m%d-%H%M", timezone="Europe/Berlin")
    assert run(berlin, [], now=late).take == "web-20260116-0030"
    tokyo = policy(name="{vm}-%H%M", timezone="Asia/Tokyo")
    assert run(tokyo, [], now=late).take == "web-0830"
    assert run(policy(name="{vm}-%Y%m%d-%H%M"), [], now=late).take == "web-20260115-2330"


def test_a_name_in_use_gets_a_suffix() -> None:
    p = policy(name="{vm}-daily", every_s=HOUR)
    assert run(p, [snap("web-daily", ago(2 * HOUR))]).take == "web-daily-2"
    taken = [snap("web-daily", ago(3 * HOUR)), snap("web-daily-2", ago(2 * HOUR))]
    assert run(p, taken).take == "web-daily-3"


def test_a_name_used_by_someone_else_or_declared_gets_a_suffix_too() -> None:
    p = policy(name="{vm}-daily")
    foreign = [snap("web-daily", ago(60), origin=SnapshotOrigin.MANUAL)]
    assert run(p, foreign).take == "web-daily-2"
    assert run(p, [], declared=frozenset({"web-daily", "web-daily-2"})).take == "web-daily-3"


def test_two_in_the_same_second_get_distinct_names() -> None:
    p = policy(name="{vm}-%Y%m%d-%H%M%S")
    host: list[LiveSnapshot] = []
    names = []
    for _ in range(4):
        d = run(p, host, ignore_schedule=True)
        assert d.take is not None
        names.append(d.take)
        host.append(snap(d.take, NOW))
    base = "web-20260310-120000"
    assert names == [base, f"{base}-2", f"{base}-3", f"{base}-4"]


# ---- ignore_schedule -----------------------------------------------------------------------------

def test_ignore_schedule_takes_even_when_not_due() -> None:
    taken = [snap("fresh", ago(1))]
    assert run(policy(every_s=DAY), taken).take is None
    d = run(policy(every_s=DAY), taken, ignore_schedule=True)
    assert d.take is not None and "ignore-schedule" in d.why
    cron = policy(every_s=None, schedule="0 3 1 1 *")
    assert run(cron, taken, ignore_schedule=True).take is not None


def test_ignore_schedule_still_applies_retention() -> None:
    taken = [snap("a", ago(2)), snap("b", ago(1))]
    d = run(policy(every_s=DAY, keep=2), taken, ignore_schedule=True)
    assert d.take is not None and d.remove == ("a",)


@pytest.mark.parametrize("running", [True, False])
def test_decide_is_pure(running: bool) -> None:
    taken = [snap("a", ago(2 * HOUR)), snap("b", ago(HOUR + 1))]
    before = list(taken)
    p = policy(keep=1, when_stopped=True)
    assert run(p, taken, running=running) == run(p, taken, running=running)
    assert taken == before


def test_a_stopped_vm_keeps_its_newest_policy_snapshot_whatever_its_age() -> None:
    p = policy(keep_for_s=DAY)
    taken = [snap("a", ago(3 * DAY)), snap("b", ago(2 * DAY))]
    d = run(p, taken, running=False)
    assert d.take is None and d.remove == ("a",)
