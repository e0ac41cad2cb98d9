"""Schedules: cron expressions and durations (snapshot policies, maintenance windows). A
maintenance window: a cron expression says when it opens, a duration how long it stays open.
Self-contained (no cron library) so the controller's notion of "may apply now" cannot
change under it with a dependency's upgrade.

Firing times are local wall-clock times in the window's timezone, each firing at most once, as
cron does across daylight saving changes: a time the clocks pass twice (set back) fires at its
first occurrence, and a time the clocks skip (set forward) fires at the moment they skip it, so
a nightly window at 02:30 in Europe/Berlin still opens on the night of the change.

Searches skip by fields (matching days, then hours, minutes, seconds) and never scan time
step by step, so an answer costs microseconds to a few milliseconds even for rare expressions.
"""

from __future__ import annotations

import calendar
import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import MAXYEAR, UTC, date, datetime, time, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# A search gives up after this many years: a leap day may be 8 years away (2096 -> 2104), and an
# expression that never fires (30 February) must still answer.
HORIZON_YEARS = 8


@dataclass(frozen=True)
class WindowState:
    """The maintenance windows of a project's policy, as of one moment."""

    defined: bool = False
    open: bool = False
    closes_at: float | None = None  # when open: its end
    next_open: float | None = None  # when closed: the next start

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

MONTHS = {name: n for n, name in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}
WEEKDAYS = {name: n for n, name in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: dict[str, int]


SECOND = _Field("second", 0, 59, {})
MINUTE = _Field("minute", 0, 59, {})
HOUR = _Field("hour", 0, 23, {})
DAY = _Field("day-of-month", 1, 31, {})
MONTH = _Field("month", 1, 12, MONTHS)
WEEKDAY = _Field("day-of-week", 0, 7, WEEKDAYS)  # 0 and 7 are Sunday

_STEP = re.compile(r"^(.*)/(.*)$")


@dataclass(frozen=True)
class CronExpr:
    """A parsed cron expression: the sorted values each field allows.

    `any_day`/`any_weekday` record whether the day-of-month/day-of-week field starts with `*`
    (or is `?`): as in Vixie cron and cronie, only when both are restricted does a day match
    if either matches; otherwise both must (and the unrestricted one always does).
    """

    text: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]  # 0 = Sunday
    any_day: bool = True
    any_weekday: bool = True

    @classmethod
    def parse(cls, text: str) -> CronExpr:
        """5 fields (minute hour day-of-month month day-of-week, firing at second 0), 6 fields
        with the second first (as Quartz and Spring write it), or a macro such as @daily."""
        stripped = text.strip()
        if not stripped:
            raise ValueError("cron expression is empty")
        if stripped.startswith("@"):
            expanded = MACROS.get(stripped.lower())
            if expanded is None:
                raise ValueError(f"cron expression {text!r}: unknown macro {stripped!r} "
                                 f"(known: {', '.join(MACROS)})")
            parts = ["0", *expanded.split()]
        else:
            parts = stripped.split()
            if len(parts) == 5:
                parts = ["0", *parts]
            elif len(parts) != 6:
                raise ValueError(
                    f"cron expression {text!r} has {len(parts)} fields; expected 5 (minute hour "
                    f"day-of-month month day-of-week) or 6 (second minute hour day-of-month "
                    f"month day-of-week)")
        try:
            weekdays = {0 if d == 7 else d for d in _parse_field(parts[5], WEEKDAY)}
            return cls(
                text=text,
                seconds=tuple(sorted(_parse_field(parts[0], SECOND))),
                minutes=tuple(sorted(_parse_field(parts[1], MINUTE))),
                hours=tuple(sorted(_parse_field(parts[2], HOUR))),
                days=tuple(sorted(_parse_field(parts[3], DAY))),
                months=tuple(sorted(_parse_field(parts[4], MONTH))),
                weekdays=tuple(sorted(weekdays)),
                any_day=_unrestricted(parts[3]),
                any_weekday=_unrestricted(parts[5]))
        except ValueError as exc:
            raise ValueError(f"cron expression {text!r}: {exc}") from None

    def __str__(self) -> str:
        return self.text

    def matches(self, dt: datetime) -> bool:
        """Whether the wall-clock time `dt` shows (in its own zone, or naive) is a firing time."""
        return (dt.second in self.seconds and dt.minute in self.minutes
                and dt.hour in self.hours and self.day_matches(dt.date()))

    def day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return dom and dow
        return dom or dow

    # Wall-clock searches (naive datetimes at whole seconds).

    def next_wall(self, start: datetime) -> datetime | None:
        """The first matching wall-clock time at or after `start`."""
        day = start.date()
        if self.day_matches(day):
            hms = self._time_at_or_after(start.hour, start.minute, start.second)
            if hms is not None:
                return datetime.combine(day, time(*hms))
        for d in self._days(day + timedelta(days=1), forward=True, bound=None):
            return datetime.combine(d, time(self.hours[0], self.minutes[0], self.seconds[0]))
        return None

    def prev_wall(self, start: datetime, not_before: date | None = None) -> datetime | None:
        """The last matching wall-clock time at or before `start` (on `not_before` or later)."""
        day = start.date()
        if self.day_matches(day):
            hms = self._time_at_or_before(start.hour, start.minute, start.second)
            if hms is not None:
                return datetime.combine(day, time(*hms))
        for d in self._days(day - timedelta(days=1), forward=False, bound=not_before):
            return datetime.combine(d, time(self.hours[-1], self.minutes[-1], self.seconds[-1]))
        return None

    def _time_at_or_after(self, h: int, m: int, s: int) -> tuple[int, int, int] | None:
        hours, minutes, seconds = self.hours, self.minutes, self.seconds
        i = bisect_left(hours, h)
        if i < len(hours) and hours[i] == h:
            j = bisect_left(minutes, m)
            if j < len(minutes) and minutes[j] == m:
                k = bisect_left(seconds, s)
                if k < len(seconds):
                    return h, m, seconds[k]
                j += 1
            if j < len(minutes):
                return h, minutes[j], seconds[0]
            i += 1
        if i < len(hours):
            return hours[i], minutes[0], seconds[0]
        return None

    def _time_at_or_before(self, h: int, m: int, s: int) -> tuple[int, int, int] | None:
        hours, minutes, seconds = self.hours, self.minutes, self.seconds
        i = bisect_right(hours, h) - 1
        if i >= 0 and hours[i] == h:
            j = bisect_right(minutes, m) - 1
            if j >= 0 and minutes[j] == m:
                k = bisect_right(seconds, s) - 1
                if k >= 0:
                    return h, m, seconds[k]
                j -= 1
            if j >= 0:
                return h, minutes[j], seconds[-1]
            i -= 1
        if i >= 0:
            return hours[i], minutes[-1], seconds[-1]
        return None

    def _days(self, first: date, forward: bool, bound: date | None) -> Iterator[date]:
        """Matching days from `first` on (or back), month by allowed month, within the horizon
        (and, going back, not before `bound`)."""
        if forward:
            last_year = min(first.year + HORIZON_YEARS, MAXYEAR)
            for year in range(first.year, last_year + 1):
                for month in self.months:
                    if (year, month) < (first.year, first.month):
                        continue
                    start = first.day if (year, month) == (first.year, first.month) else 1
                    for d in range(start, calendar.monthrange(year, month)[1] + 1):
                        day = date(year, month, d)
                        if self.day_matches(day):
                            yield day
            return
        floor = bound if bound is not None else date(max(1, first.year - HORIZON_YEARS), 1, 1)
        for year in range(first.year, floor.year - 1, -1):
            for month in reversed(self.months):
                if (year, month) > (first.year, first.month):
                    continue
                if (year, month) < (floor.year, floor.month):
                    return
                end = (first.day if (year, month) == (first.year, first.month)
                       else calendar.monthrange(year, month)[1])
                for d in range(end, 0, -1):
                    day = date(year, month, d)
                    if day < floor:
                        return
                    if self.day_matches(day):
                        yield day


def _unrestricted(text: str) -> bool:
    return text.startswith("*") or text == "?"


def _parse_field(text: str, spec: _Field) -> set[int]:
    if spec in (DAY, WEEKDAY) and text == "?":
        text = "*"
    values: set[int] = set()
    for item in text.split(","):
        try:
            values |= _parse_item(item, spec)
        except ValueError as exc:
            raise ValueError(f"{spec.name} field: {exc}") from None
    return values


def _parse_item(item: str, spec: _Field) -> set[int]:
    if not item:
        raise ValueError("empty list element")
    step = 1
    base = item
    stepped = _STEP.match(item)
    if stepped:
        base, step_text = stepped.groups()
        if not step_text.isdigit():
            raise ValueError(f"step {step_text!r} in {item!r} is not a number")
        step = int(step_text)
        # `*` stops at 6 in day-of-week, so `*/2` does not take Sunday as both 0 and 7.
        span = (6 if spec is WEEKDAY else spec.high) - spec.low + 1
        if not 1 <= step <= span:
            raise ValueError(f"step {step} in {item!r} is out of range 1-{span}")
    if base == "*":
        low, high = spec.low, (6 if spec is WEEKDAY else spec.high)
    elif "-" in base:
        left, _, right = base.partition("-")
        low, high = _value(left, spec, item), _value(right, spec, item)
        if spec is WEEKDAY and right.upper() == "SUN":
            high = 7  # MON-SUN: Sunday as the end of the week
        if low > high:
            raise ValueError(f"range {base!r} ends before it starts")
    else:
        low = _value(base, spec, item)
        # `a/n` (as Quartz writes it) steps from a to the end of the field; `a` alone is just a.
        high = (6 if spec is WEEKDAY else spec.high) if stepped else low
    return set(range(low, high + 1, step))


def _value(token: str, spec: _Field, item: str) -> int:
    if token.isdigit():
        number = int(token)
        if not spec.low <= number <= spec.high:
            raise ValueError(f"{token} is out of range {spec.low}-{spec.high}")
        return number
    named = spec.names.get(token.upper())
    if named is not None:
        return named
    where = f"{token!r}" if token == item else f"{token!r} in {item!r}"
    if spec.names:
        raise ValueError(f"{where} is neither a number nor one of {', '.join(spec.names)}")
    raise ValueError(f"{where} is not a number")


_NUM = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile(rf"(?:{_NUM}d)?\s*(?:{_NUM}h)?\s*(?:{_NUM}m)?\s*(?:{_NUM}s)?")
_UNITS = (86400.0, 3600.0, 60.0, 1.0)


def parse_duration(text: str | int | float) -> float:
    """Seconds: a number, or units largest first ("90s", "30m", "2h", "1h30m", "1d")."""
    if isinstance(text, bool):
        raise ValueError(f"duration {text!r} is not a number of seconds")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        spec = text.strip().lower()
        parts = _DURATION.fullmatch(spec) if spec else None
        if re.fullmatch(_NUM, spec):
            seconds = float(spec)
        elif parts is None or not any(parts.groups()):
            raise ValueError(f"duration {text!r} is neither a number of seconds nor like "
                             f"90s, 30m, 2h, 1h30m, 1d")
        else:
            seconds = sum(float(n) * unit for n, unit in zip(parts.groups(), _UNITS, strict=True)
                          if n is not None)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration {text!r} is not a finite number of seconds >= 0")
    return seconds


@dataclass(frozen=True)
class Window:
    """A maintenance window: opens at each firing of `cron` in `timezone`, for `duration` s.

    Times returned are aware datetimes in UTC: a datetime in the window's zone during the hour
    repeated in autumn compares unequal to every datetime of another zone (PEP 495), and
    arithmetic on a zoned datetime is wall-clock arithmetic, an hour off across a change.
    """

    cron: CronExpr
    duration: float
    timezone: str = "UTC"
    text: str = ""  # the expression as written; the cron's own text when not given
    _tz: tzinfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.duration, int | float) and not isinstance(self.duration, bool)
                and math.isfinite(self.duration)
                and self.duration > 0):
            raise ValueError(f"window duration {self.duration!r} must be a number of seconds "
                             f"> 0")
        object.__setattr__(self, "_tz", zone(self.timezone))
        if not self.text:
            object.__setattr__(self, "text", self.cron.text)

    @classmethod
    def parse(cls, cron: str, duration: str | int | float, timezone: str = "UTC") -> Window:
        return cls(CronExpr.parse(cron), parse_duration(duration), timezone, cron)

    def opened_at(self, now: datetime) -> datetime | None:
        """The start of the occurrence that contains `now` (start <= now < start + duration),
        or None when the window is closed. Occurrences that overlap (a window longer than its
        period) count from the latest start, the one that closes last."""
        now_utc = _utc(now)
        local = now_utc.astimezone(self._tz)
        upper = _wall(local)
        if local.fold:
            # In the repeated hour's second pass every wall time of that hour fired already, on
            # the first pass: the latest start may lie after `now`'s own wall time.
            upper = self._repeat_end(now_utc) - timedelta(seconds=1)
        earliest = (now_utc - timedelta(seconds=self.duration)).astimezone(self._tz).date()
        wall = self.cron.prev_wall(upper, not_before=earliest - timedelta(days=1))
        if wall is None:
            return None
        start = self._instant(wall)
        if start <= now_utc < start + timedelta(seconds=self.duration):
            return start
        return None

    def closes_at(self, now: datetime) -> datetime | None:
        """When the occurrence containing `now` ends, or None when the window is closed."""
        start = self.opened_at(now)
        if start is None:
            return None
        return start + timedelta(seconds=self.duration)

    def next_open(self, now: datetime) -> datetime | None:
        """The first firing strictly after `now` (even while open), or None when there is none
        within HORIZON_YEARS (30 February)."""
        now_utc = _utc(now)
        local = now_utc.astimezone(self._tz)
        start = _wall(local) + timedelta(seconds=1)
        if local.fold:
            start = max(start, self._repeat_end(now_utc))
        while True:
            wall = self.cron.next_wall(start)
            if wall is None:
                return None
            instant = self._instant(wall)
            if instant > now_utc:
                return instant
            start = wall + timedelta(seconds=1)

    def _instant(self, wall: datetime) -> datetime:
        """When wall-clock time `wall` fires: its first occurrence, or when the clocks skip it."""
        first = wall.replace(tzinfo=self._tz, fold=0).astimezone(UTC)
        if _wall(first.astimezone(self._tz)) == wall:
            return first
        other = wall.replace(tzinfo=self._tz, fold=1).astimezone(UTC)
        return _transition(min(first, other), max(first, other), self._tz)

    def _repeat_end(self, now_utc: datetime) -> datetime:
        """For a `now` in the second pass of a repeated hour: the wall time the first pass
        ended at (the clocks were set back from it)."""
        local = now_utc.astimezone(self._tz)
        first_pass = local.replace(fold=0)
        back = (first_pass.utcoffset() or timedelta()) - (local.utcoffset() or timedelta())
        change = _transition(now_utc - back, now_utc, self._tz)
        return _wall((change - timedelta(seconds=1)).astimezone(self._tz)) + timedelta(seconds=1)


def windows_state(windows: Sequence[Window], now: datetime) -> WindowState:
    """Open while any window is open, until the last of the open ones closes; otherwise when
    the first one opens next."""
    if not windows:
        return WindowState()
    ends = [end.timestamp() for w in windows if (end := w.closes_at(now)) is not None]
    if ends:
        return WindowState(defined=True, open=True, closes_at=max(ends))
    starts = [start.timestamp() for w in windows if (start := w.next_open(now)) is not None]
    return WindowState(defined=True, open=False, next_open=min(starts) if starts else None)


def zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (an IANA name such as Europe/Berlin)"
                         ) from None


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"{now.isoformat()} has no timezone; windows need an aware datetime")
    return now.astimezone(UTC)


def _wall(dt: datetime) -> datetime:
    return dt.replace(tzinfo=None, microsecond=0, fold=0)


def _transition(low: datetime, high: datetime, tz: tzinfo) -> datetime:
    """The first whole second in (low, high] whose UTC offset in `tz` differs from low's."""
    before = low.astimezone(tz).utcoffset()
    lo, hi = math.floor(low.timestamp()), math.ceil(high.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == before:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)
