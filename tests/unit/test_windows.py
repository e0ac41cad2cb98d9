"""Maintenance windows: cron parsing, matching, and the window searches (also across DST)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmctl.schedule import CronExpr, Window, parse_duration, windows_state
from kvmctl.sync.status import WindowState

BERLIN = ZoneInfo("Europe/Berlin")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def fires(expr: str, year: int, month: int, day: int, hour: int, minute: int) -> bool:
    return CronExpr.parse(expr).matches(datetime(year, month, day, hour, minute))


# Syntax


def test_star_matches_every_minute_at_second_zero() -> None:
    cron = CronExpr.parse("* * * * *")
    assert cron.minutes == tuple(range(60))
    assert cron.hours == tuple(range(24))
    assert cron.days == tuple(range(1, 32))
    assert cron.months == tuple(range(1, 13))
    assert cron.weekdays == tuple(range(7))
    assert cron.seconds == (0,)
    assert cron.matches(datetime(2025, 5, 17, 13, 7, 0))
    assert not cron.matches(datetime(2025, 5, 17, 13, 7, 1))


def test_numbers() -> None:
    cron = CronExpr.parse("5 4 3 2 1")
    assert (cron.minutes, cron.hours, cron.days, cron.months, cron.weekdays) == (
        (5,), (4,), (3,), (2,), (1,))


def test_ranges_lists_and_steps() -> None:
    assert CronExpr.parse("10-15 * * * *").minutes == (10, 11, 12, 13, 14, 15)
    assert CronExpr.parse("1,5,59 * * * *").minutes == (1, 5, 59)
    assert CronExpr.parse("*/15 * * * *").minutes == (0, 15, 30, 45)
    assert CronExpr.parse("10-30/10 * * * *").minutes == (10, 20, 30)
    assert CronExpr.parse("0 1-5/2,20-22 * * *").hours == (1, 3, 5, 20, 21, 22)
    assert CronExpr.parse("0 0 */10 * *").days == (1, 11, 21, 31)
    assert CronExpr.parse("0 0 * */5 *").months == (1, 6, 11)


def test_value_with_step_runs_to_the_end_of_the_field() -> None:
    assert CronExpr.parse("50/3 * * * *").minutes == (50, 53, 56, 59)


def test_overlapping_list_elements_merge() -> None:
    assert CronExpr.parse("0-10/5,5,*/30 * * * *").minutes == (0, 5, 10, 30)


def test_month_and_weekday_names_any_case() -> None:
    cron = CronExpr.parse("0 0 * jan,Mar-MAY mon-Fri")
    assert cron.months == (1, 3, 4, 5)
    assert cron.weekdays == (1, 2, 3, 4, 5)
    assert CronExpr.parse("0 0 * DEC sun,SAT").weekdays == (0, 6)
    assert CronExpr.parse("0 0 * FEB-DEC/5 *").months == (2, 7, 12)


def test_seven_is_sunday() -> None:
    assert CronExpr.parse("0 0 * * 7").weekdays == (0,)
    assert CronExpr.parse("0 0 * * 5-7").weekdays == (0, 5, 6)
    assert CronExpr.parse("0 0 * * 0,7").weekdays == (0,)
    assert CronExpr.parse("0 0 * * MON-SUN").weekdays == tuple(range(7))
    assert fires("0 0 * * 7", 2025, 6, 1, 0, 0)  # a Sunday
    assert not fires("0 0 * * 7", 2025, 6, 2, 0, 0)


def test_weekday_step_over_star_does_not_double_sunday() -> None:
    assert CronExpr.parse("0 0 * * */2").weekdays == (0, 2, 4, 6)


def test_question_mark_in_day_fields_means_any() -> None:
    assert CronExpr.parse("0 0 ? * MON").any_day
    assert CronExpr.parse("0 0 1 * ?").any_weekday


@pytest.mark.parametrize(("macro", "same_as"), [
    ("@hourly", "0 * * * *"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"),
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@DAILY", "0 0 * * *"),
])
def test_macros(macro: str, same_as: str) -> None:
    a, b = CronExpr.parse(macro), CronExpr.parse(same_as)
    assert a.text == macro
    assert (a.seconds, a.minutes, a.hours, a.days, a.months, a.weekdays) == (
        b.seconds, b.minutes, b.hours, b.days, b.months, b.weekdays)


def test_whitespace_between_fields_is_free() -> None:
    assert CronExpr.parse("  0\t2  * *  *  ").hours == (2,)


# Day-of-month and day-of-week


def test_both_day_fields_restricted_match_either() -> None:
    expr = "0 0 13 * FRI"
    assert fires(expr, 2025, 5, 13, 0, 0)  # the 13th, a Tuesday
    assert fires(expr, 2025, 5, 16, 0, 0)  # a Friday, the 16th
    assert fires(expr, 2025, 6, 13, 0, 0)  # Friday the 13th
    assert not fires(expr, 2025, 5, 14, 0, 0)  # Wednesday the 14th


def test_one_day_field_restricted_alone_decides() -> None:
    assert fires("0 0 13 * *", 2025, 5, 13, 0, 0)
    assert not fires("0 0 13 * *", 2025, 5, 16, 0, 0)
    assert fires("0 0 * * FRI", 2025, 5, 16, 0, 0)
    assert not fires("0 0 * * FRI", 2025, 5, 13, 0, 0)


def test_day_field_starting_with_star_counts_as_unrestricted() -> None:
    # As Vixie cron and cronie: `*/2` is not a restriction for the either-rule, so both apply.
    expr = "0 0 */2 * MON"
    assert fires(expr, 2025, 5, 5, 0, 0)  # Monday the 5th
    assert not fires(expr, 2025, 5, 12, 0, 0)  # Monday the 12th (even)
    assert not fires(expr, 2025, 5, 7, 0, 0)  # Wednesday the 7th


def test_month_restricts_both_day_fields() -> None:
    expr = "0 0 13 JUN FRI"
    assert fires(expr, 2025, 6, 6, 0, 0)
    assert not fires(expr, 2025, 5, 13, 0, 0)
    assert not fires(expr, 2025, 5, 16, 0, 0)


# Errors


@pytest.mark.parametrize(("text", "message"), [
    ("61 * * * *", "minute field: 61 is out of range 0-59"),
    ("* 24 * * *", "hour field: 24 is out of range 0-23"),
    ("* * 0 * *", "day-of-month field: 0 is out of range 1-31"),
    ("* * 32 * *", "day-of-month field: 32 is out of range 1-31"),
    ("* * * 13 *", "month field: 13 is out of range 1-12"),
    ("* * * * 8", "day-of-week field: 8 is out of range 0-7"),
    ("60 * * * * *", "second field: 60 is out of range 0-59"),
    ("*/0 * * * *", "minute field: step 0 in '*/0' is out of range 1-60"),
    ("*/61 * * * *", "minute field: step 61"),
    ("*/x * * * *", "minute field: step 'x' in '*/x' is not a number"),
    ("30-10 * * * *", "minute field: range '30-10' ends before it starts"),
    ("1,,2 * * * *", "minute field: empty list element"),
    ("a * * * *", "minute field: 'a' is not a number"),
    ("* * * JUNE *", "month field: 'JUNE' is neither a number nor one of JAN"),
    ("* * * * MON-FUN", "day-of-week field: 'FUN' in 'MON-FUN' is neither"),
    ("* * * MON *", "month field: 'MON'"),
    ("* * * * JAN", "day-of-week field: 'JAN'"),
    ("-5 * * * *", "minute field:"),
    ("* * * *", "has 4 fields; expected 5"),
    ("* * * * * * *", "has 7 fields"),
    ("", "empty"),
    ("   ", "empty"),
    ("@reboot", "unknown macro '@reboot'"),
    ("@every 5m", "unknown macro"),
])
def test_invalid_expressions_name_field_and_token(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        CronExpr.parse(text)
    assert message in str(caught.value)
    if text.strip():
        assert repr(text) in str(caught.value)


# The seconds form


def test_six_fields_take_the_second_first() -> None:
    cron = CronExpr.parse("*/20 30 4 * * *")
    assert cron.seconds == (0, 20, 40)
    assert cron.minutes == (30,)
    assert cron.hours == (4,)
    assert cron.matches(datetime(2025, 1, 1, 4, 30, 40))
    assert not cron.matches(datetime(2025, 1, 1, 4, 30, 41))


def test_a_window_a_few_seconds_from_now() -> None:
    now = utc(2025, 3, 4, 10, 0, 0) + timedelta(microseconds=250_000)
    at = now + timedelta(seconds=5)
    window = Window.parse(f"{at.second} {at.minute} {at.hour} * * *", 30)
    assert window.opened_at(now) is None
    assert window.next_open(now) == at.replace(microsecond=0)
    assert window.opened_at(at) == at.replace(microsecond=0)
    assert window.closes_at(at) == at.replace(microsecond=0) + timedelta(seconds=30)


def test_every_second_window_next_is_the_next_second() -> None:
    window = Window.parse("* * * * * *", 1)
    now = utc(2025, 3, 4, 10, 0, 0) + timedelta(microseconds=1)
    assert window.next_open(now) == utc(2025, 3, 4, 10, 0, 1)
    assert window.opened_at(now) == utc(2025, 3, 4, 10, 0, 0)


# Window searches


def test_open_exactly_at_start_and_closed_exactly_at_end() -> None:
    window = Window.parse("0 2 * * *", "1h")
    start = utc(2025, 7, 1, 2, 0)
    assert window.opened_at(start) == start
    assert window.closes_at(start) == utc(2025, 7, 1, 3, 0)
    just_before_end = utc(2025, 7, 1, 3, 0) - timedelta(microseconds=1)
    assert window.opened_at(just_before_end) == start
    assert window.opened_at(utc(2025, 7, 1, 3, 0)) is None
    assert window.closes_at(utc(2025, 7, 1, 3, 0)) is None
    assert window.opened_at(start - timedelta(microseconds=1)) is None


def test_next_open_is_strictly_after_now() -> None:
    window = Window.parse("0 2 * * *", "1h")
    assert window.next_open(utc(2025, 7, 1, 2, 0)) == utc(2025, 7, 2, 2, 0)
    assert window.next_open(utc(2025, 7, 1, 1, 59, 59)) == utc(2025, 7, 1, 2, 0)
    assert window.next_open(utc(2025, 7, 1, 2, 30)) == utc(2025, 7, 2, 2, 0)  # while open


def test_window_spanning_midnight() -> None:
    window = Window.parse("0 23 * * *", "3h")
    assert window.opened_at(utc(2025, 7, 2, 1, 30)) == utc(2025, 7, 1, 23, 0)
    assert window.closes_at(utc(2025, 7, 2, 1, 30)) == utc(2025, 7, 2, 2, 0)
    assert window.opened_at(utc(2025, 7, 2, 2, 0)) is None
    assert window.next_open(utc(2025, 7, 2, 2, 0)) == utc(2025, 7, 2, 23, 0)


def test_window_spanning_month_and_year_ends() -> None:
    window = Window.parse("0 23 28-31 * *", "2h")
    assert window.opened_at(utc(2025, 2, 1, 0, 30)) == utc(2025, 1, 31, 23, 0)
    assert window.opened_at(utc(2025, 3, 1, 0, 30)) == utc(2025, 2, 28, 23, 0)
    assert window.opened_at(utc(2025, 5, 1, 0, 30)) == utc(2025, 4, 30, 23, 0)
    assert window.opened_at(utc(2026, 1, 1, 0, 59)) == utc(2025, 12, 31, 23, 0)
    assert window.next_open(utc(2025, 12, 31, 23, 0)) == utc(2026, 1, 28, 23, 0)
    monthly = Window.parse("0 22 31 * *", "4h")
    assert monthly.next_open(utc(2025, 1, 31, 23, 0)) == utc(2025, 3, 31, 22, 0)
    assert monthly.opened_at(utc(2025, 4, 1, 1, 59)) == utc(2025, 3, 31, 22, 0)


def test_weekend_window_two_days_long() -> None:
    window = Window.parse("0 0 * * SAT", "2d")
    assert window.opened_at(utc(2025, 5, 18, 23, 59)) == utc(2025, 5, 17, 0, 0)  # Sunday
    assert window.opened_at(utc(2025, 5, 19, 0, 0)) is None  # Monday
    assert window.next_open(utc(2025, 5, 19, 0, 0)) == utc(2025, 5, 24, 0, 0)


def test_overlapping_occurrences_count_from_the_latest_start() -> None:
    window = Window.parse("0 * * * *", "90m")
    assert window.opened_at(utc(2025, 5, 1, 10, 20)) == utc(2025, 5, 1, 10, 0)
    assert window.closes_at(utc(2025, 5, 1, 10, 20)) == utc(2025, 5, 1, 11, 30)


def test_leap_day() -> None:
    window = Window.parse("0 0 29 2 *", "1d")
    assert window.next_open(utc(2025, 3, 1)) == utc(2028, 2, 29)
    assert window.next_open(utc(2024, 1, 1)) == utc(2024, 2, 29)
    assert window.opened_at(utc(2024, 2, 29, 12)) == utc(2024, 2, 29)
    assert window.opened_at(utc(2025, 2, 28, 12)) is None
    # 2100 is no leap year: the next leap day after 2096 is 8 years away.
    assert window.next_open(utc(2096, 3, 1)) == utc(2104, 2, 29)


@pytest.mark.parametrize("expr", ["0 0 30 2 *", "0 0 31 4,6,9,11 *", "0 0 31 FEB *"])
def test_impossible_dates_never_open(expr: str) -> None:
    window = Window.parse(expr, "1d")
    assert window.next_open(utc(2025, 1, 1)) is None
    assert window.opened_at(utc(2025, 3, 1)) is None
    assert window.closes_at(utc(2025, 3, 1)) is None


def test_either_day_rule_in_window_search() -> None:
    window = Window.parse("0 3 13 * FRI", "1h")
    assert window.next_open(utc(2025, 5, 10)) == utc(2025, 5, 13, 3)  # Tuesday the 13th
    assert window.next_open(utc(2025, 5, 13, 3)) == utc(2025, 5, 16, 3)  # the next Friday


def test_results_are_utc() -> None:
    window = Window.parse("0 2 * * *", "1h", "Europe/Berlin")
    nxt = window.next_open(utc(2025, 7, 1, 12))
    assert nxt is not None
    assert nxt.tzinfo is UTC
    assert nxt == utc(2025, 7, 2, 0, 0)
    assert (nxt.astimezone(BERLIN).hour, nxt.astimezone(BERLIN).minute) == (2, 0)
    assert window.opened_at(nxt) == nxt
    closes = window.closes_at(nxt)
    assert closes is not None and closes.tzinfo is UTC


def test_now_in_another_zone_is_the_same_instant() -> None:
    window = Window.parse("0 2 * * *", "1h")
    tokyo = ZoneInfo("Asia/Tokyo")
    assert window.opened_at(datetime(2025, 7, 1, 11, 30, tzinfo=tokyo)) == utc(2025, 7, 1, 2)


# Daylight saving time (Europe/Berlin: 2025-03-30 02:00 -> 03:00, 2025-10-26 03:00 -> 02:00)


def test_berlin_offset_follows_summer_and_winter_time() -> None:
    window = Window.parse("0 9 * * *", "1h", "Europe/Berlin")
    assert window.next_open(utc(2025, 1, 10)) == utc(2025, 1, 10, 8)  # CET, +01:00
    assert window.next_open(utc(2025, 7, 10)) == utc(2025, 7, 10, 7)  # CEST, +02:00


def test_berlin_window_on_the_spring_change_day_spans_the_short_night() -> None:
    window = Window.parse("0 1 * * *", "3h", "Europe/Berlin")
    assert window.opened_at(utc(2025, 3, 30, 0)) == utc(2025, 3, 30, 0)
    # 3 h of real time: 01:00 CET to 05:00 CEST by the clock.
    end = window.closes_at(utc(2025, 3, 30, 0))
    assert end == utc(2025, 3, 30, 3)
    assert end is not None and end.astimezone(BERLIN).hour == 5


def test_berlin_skipped_time_fires_when_the_clocks_skip_it() -> None:
    window = Window.parse("30 2 * * *", "1h", "Europe/Berlin")
    first = window.next_open(utc(2025, 3, 29, 12))
    assert first == utc(2025, 3, 30, 1, 0)  # 03:00 CEST, the moment 02:00-03:00 was skipped
    assert window.next_open(first) == utc(2025, 3, 31, 0, 30)  # 02:30 CEST
    assert window.opened_at(utc(2025, 3, 30, 1, 59)) == first
    assert window.opened_at(utc(2025, 3, 30, 2, 0)) is None


def test_berlin_repeated_time_fires_once() -> None:
    window = Window.parse("30 2 * * *", "20m", "Europe/Berlin")
    first = window.next_open(utc(2025, 10, 25, 12))
    assert first == utc(2025, 10, 26, 0, 30)  # 02:30 CEST, the first pass
    assert window.next_open(first) == utc(2025, 10, 27, 1, 30)  # 02:30 CET the next day
    assert window.opened_at(utc(2025, 10, 26, 1, 35)) is None  # 02:35 CET, the second pass


def test_berlin_second_pass_of_repeated_hour_sees_the_first_passes_start() -> None:
    window = Window.parse("0 2 * * *", "2h", "Europe/Berlin")
    now = utc(2025, 10, 26, 1, 30)  # 02:30 CET, the clocks show 02:30 for the second time
    assert now.astimezone(BERLIN).fold == 1
    assert window.opened_at(now) == utc(2025, 10, 26, 0, 0)  # 02:00 CEST
    assert window.closes_at(now) == utc(2025, 10, 26, 2, 0)  # 03:00 CET
    later = Window.parse("45 2 * * *", "1h", "Europe/Berlin")
    assert later.opened_at(now) == utc(2025, 10, 26, 0, 45)  # after now's clock, before now
    assert later.next_open(now) == utc(2025, 10, 27, 1, 45)


def test_berlin_every_quarter_hour_across_both_changes() -> None:
    window = Window.parse("*/15 * * * *", "15m", "Europe/Berlin")
    spring = utc(2025, 3, 30, 0, 50)  # 01:50 CET
    assert window.next_open(spring) == utc(2025, 3, 30, 1, 0)  # 03:00 CEST
    assert window.opened_at(utc(2025, 3, 30, 1, 10)) == utc(2025, 3, 30, 1, 0)
    autumn = utc(2025, 10, 26, 1, 5)  # 02:05 CET, second pass
    assert window.next_open(autumn) == utc(2025, 10, 26, 2, 0)  # 03:00 CET
    assert window.opened_at(autumn) is None  # the 02:45 CEST quarter ended at 01:00 UTC


# Durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("1d", 86400),
    ("1d2h3m4s", 93784), ("1h 30m", 5400), ("1.5h", 5400), ("2H", 7200),
    ("45", 45), ("2.5", 2.5), (" 10m ", 600), (600, 600), (0.25, 0.25), ("0s", 0),
])
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", " ", "h", "30ms", "1m1h", "1h1h", "-5", "-5m", "1 h x",
                                  "5w", "1e3", "nan", "inf", float("nan"), float("inf"), -1,
                                  True])
def test_parse_duration_rejects(text: str | int | float) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# Window construction


@pytest.mark.parametrize("duration", [0, -1, float("nan"), float("inf")])
def test_window_needs_positive_duration(duration: float) -> None:
    with pytest.raises(ValueError, match="duration"):
        Window(CronExpr.parse("@daily"), duration)


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime"])
def test_window_needs_known_timezone(zone: str) -> None:
    with pytest.raises(ValueError, match="unknown timezone"):
        Window(CronExpr.parse("@daily"), 60, zone)


def test_window_text_defaults_to_the_expression() -> None:
    assert Window(CronExpr.parse("0 2 * * SAT"), 60).text == "0 2 * * SAT"
    assert Window(CronExpr.parse("0 2 * * SAT"), 60, text="saturday night").text == (
        "saturday night")
    assert Window.parse("@weekly", "1h", "Europe/Berlin") == Window(
        CronExpr.parse("@weekly"), 3600.0, "Europe/Berlin")


def test_window_needs_an_aware_now() -> None:
    window = Window.parse("@daily", "1h")
    for method in (window.opened_at, window.next_open, window.closes_at):
        with pytest.raises(ValueError, match="no timezone"):
            method(datetime(2025, 1, 1))


# windows_state


def test_windows_state_without_windows() -> None:
    assert windows_state([], utc(2025, 1, 1)) == WindowState()


def test_windows_state_open_takes_the_latest_end() -> None:
    windows = [Window.parse("0 2 * * *", "1h"), Window.parse("30 2 * * *", "2h"),
               Window.parse("0 12 * * *", "1h")]
    state = windows_state(windows, utc(2025, 1, 1, 2, 45))
    assert state == WindowState(defined=True, open=True,
                                closes_at=utc(2025, 1, 1, 4, 30).timestamp())


def test_windows_state_closed_takes_the_earliest_start() -> None:
    windows = [Window.parse("0 12 * * *", "1h"), Window.parse("0 2 * * *", "1h"),
               Window.parse("0 0 30 2 *", "1h")]
    state = windows_state(windows, utc(2025, 1, 1, 5))
    assert state == WindowState(defined=True, open=False,
                                next_open=utc(2025, 1, 1, 12).timestamp())


def test_windows_state_never_opening() -> None:
    state = windows_state([Window.parse("0 0 30 2 *", "1h")], utc(2025, 1, 1))
    assert state == WindowState(defined=True, open=False, next_open=None)




# Properties: the searches against a brute-force scan (UTC, where wall clock is real time)

START = datetime(2024, 1, 1, tzinfo=UTC)
SCAN = timedelta(days=10)


def _field(low: int, high: int, span: int = 0) -> st.SearchStrategy[str]:
    value = st.integers(low, high)
    pair = st.tuples(value, value).map(sorted)
    return st.one_of(
        st.just("*"),
        value.map(str),
        pair.map(lambda p: f"{p[0]}-{p[1]}"),
        st.integers(1, span or high - low + 1).map(lambda n: f"*/{n}"),
        st.tuples(pair, st.integers(1, 7)).map(lambda t: f"{t[0][0]}-{t[0][1]}/{t[1]}"),
        st.lists(value, min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))),
    )


simple_expr = st.tuples(
    _field(0, 59), _field(0, 23),
    st.one_of(st.just("*"), _field(1, 31)),
    st.sampled_from(["*", "*", "*", "1-6", "*/2", "2,3"]),
    st.one_of(st.just("*"), _field(0, 7, span=7)),
).map(" ".join)

instants = st.integers(0, 2 * 365 * 86400 * 1_000_000).map(
    lambda us: START + timedelta(microseconds=us))


def brute_next(cron: CronExpr, now: datetime, end: datetime) -> datetime | None:
    t = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    while t <= end:
        if cron.matches(t):
            return t
        t += timedelta(minutes=1)
    return None


@settings(max_examples=150, deadline=None)
@given(expr=simple_expr, now=instants)
def test_next_open_agrees_with_a_minute_scan(expr: str, now: datetime) -> None:
    window = Window.parse(expr, 60)
    expected = brute_next(window.cron, now, now + SCAN)
    found = window.next_open(now)
    if expected is not None:
        assert found == expected
    else:
        assert found is None or found > now + SCAN


@settings(max_examples=150, deadline=None)
@given(expr=simple_expr, now=instants, minutes=st.integers(1, 3 * 1440))
def test_opened_at_agrees_with_a_minute_scan(expr: str, now: datetime, minutes: int) -> None:
    window = Window.parse(expr, minutes * 60)
    t = now.replace(second=0, microsecond=0)
    expected = None
    while t > now - timedelta(minutes=minutes):
        if window.cron.matches(t):
            expected = t
            break
        t -= timedelta(minutes=1)
    assert window.opened_at(now) == expected
    assert window.closes_at(now) == (None if expected is None
                                     else expected + timedelta(minutes=minutes))


@settings(max_examples=100, deadline=None)
@given(seconds=_field(0, 59), minutes=_field(0, 59), now=instants)
def test_seconds_form_agrees_with_a_second_scan(seconds: str, minutes: str,
                                                now: datetime) -> None:
    window = Window.parse(f"{seconds} {minutes} * * * *", 1)
    t = now.replace(microsecond=0) + timedelta(seconds=1)
    while not window.cron.matches(t):
        t += timedelta(seconds=1)
    assert window.next_open(now) == t


# Properties across daylight saving changes: against the documented rule, by brute force. A
# wall-clock time fires at the first instant the clocks show it or a later time: its first pass
# when repeated, the moment of the jump when skipped.

CHANGES = [  # (zone, an instant near a change)
    ("Europe/Berlin", datetime(2025, 3, 30, 1, tzinfo=UTC)),  # 02:00 -> 03:00
    ("Europe/Berlin", datetime(2025, 10, 26, 1, tzinfo=UTC)),  # 03:00 -> 02:00
    ("America/New_York", datetime(2025, 3, 9, 7, tzinfo=UTC)),
    ("America/New_York", datetime(2025, 11, 2, 6, tzinfo=UTC)),
    ("Australia/Lord_Howe", datetime(2025, 4, 5, 15, tzinfo=UTC)),  # back by 30 minutes
    ("Australia/Lord_Howe", datetime(2025, 10, 4, 15, 30, tzinfo=UTC)),
    ("America/Santiago", datetime(2025, 9, 7, 4, tzinfo=UTC)),  # 24:00 -> 01:00
]


def wall_firings(cron: CronExpr, zone: str, start: datetime, end: datetime) -> list[datetime]:
    tz = ZoneInfo(zone)
    out = []
    shown = (start - timedelta(minutes=1)).astimezone(tz).replace(tzinfo=None, fold=0)
    u = start
    while u <= end:
        wall = u.astimezone(tz).replace(tzinfo=None, fold=0)
        if wall > shown:  # the clocks reach times not shown before: those fire now
            w = shown + timedelta(minutes=1)
            while w <= wall:
                if cron.matches(w):
                    out.append(u)
                    break
                w += timedelta(minutes=1)
            shown = wall
        u += timedelta(minutes=1)
    return out


dst_expr = st.tuples(
    _field(0, 59),
    st.one_of(_field(0, 23), st.sampled_from(["*", "0-5", "2", "23,0", "1-3"])),
).map(lambda t: f"{t[0]} {t[1]} * * *")


@settings(max_examples=60, deadline=None)
@given(expr=dst_expr, change=st.sampled_from(CHANGES), offset=st.integers(-20 * 3600, 20 * 3600),
       minutes=st.integers(1, 300))
def test_searches_across_dst_changes_agree_with_the_clock(
        expr: str, change: tuple[str, datetime], offset: int, minutes: int) -> None:
    zone, near = change
    window = Window.parse(expr, minutes * 60, zone)
    now = near + timedelta(seconds=offset)
    firings = wall_firings(window.cron, zone, near - timedelta(hours=30),
                           near + timedelta(hours=30))
    expected_next = next((f for f in firings if f > now), None)
    if expected_next is not None:
        assert window.next_open(now) == expected_next
    expected_open = max((f for f in firings if f <= now < f + timedelta(minutes=minutes)),
                        default=None)
    assert window.opened_at(now) == expected_open
