# Event-loop health (mailhub/loop_monitor.py): a deliberately blocking call on an in-process loop is
# logged with the function that blocked and lands in the lag histogram; a loop blocked for good is
# reported while it lasts; stall lines are rate-limited; a real hub exports the histogram.
import asyncio
import logging
import re
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mailhub import loop_monitor, metrics
from mailhub.loop_monitor import LoopMonitor

from conftest import wait_for


def lag_counts() -> tuple[float, float]:
    """(samples in the lag histogram, samples of 0.25 s or less)"""
    registry = metrics.REGISTRY
    return (
        registry.get_sample_value("mailhub_event_loop_lag_seconds_count"),
        registry.get_sample_value("mailhub_event_loop_lag_seconds_bucket", {"le": "0.25"}),
    )


def stall_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailhub.loop"]


def deliberately_blocking(seconds: float) -> None:
    time.sleep(seconds)


async def run_with_monitor(monitor: LoopMonitor, *blocks: float) -> None:
    monitor.start()
    try:
        await asyncio.sleep(0.3)  # pacing: the monitor's ticks measured before the first block
        for seconds in blocks:
            asyncio.get_running_loop().call_soon(deliberately_blocking, seconds)
            await asyncio.sleep(seconds + 0.2)  # pacing: the block, then ticks after it
    finally:
        monitor.stop()


def test_a_blocking_call_is_logged_with_its_function_and_measured(caplog):
    caplog.set_level(logging.WARNING, "mailhub.loop")
    count, fast = lag_counts()
    stalls = metrics.REGISTRY.get_sample_value("mailhub_event_loop_stalls_total")
    asyncio.run(run_with_monitor(LoopMonitor(threshold=0.2), 0.6))
    lines = [line for line in stall_lines(caplog) if "deliberately_blocking" in line]
    assert len(lines) == 1, stall_lines(caplog)
    line = lines[0]
    assert line.startswith("event loop stalled 0.")
    assert float(line.split()[3]) >= 0.4  # the lateness of the tick, about the 0.6 s blocked
    # the innermost frame (time.sleep is C: the project frame that called it comes first)
    assert "tests/test_loop_monitor.py:" in line and line.index("deliberately_blocking") < line.index("<-")
    new_count, new_fast = lag_counts()
    assert new_count > count + 2  # ticks measured all along
    assert new_count - new_fast >= count - fast + 1  # at least one sample over 0.25 s
    assert metrics.REGISTRY.get_sample_value("mailhub_event_loop_stalls_total") >= stalls + 1


def regex_in_c() -> None:
    """Catastrophic backtracking: about a second in C code that holds the GIL throughout (no Python
    thread, the watchdog included, can run meanwhile)."""
    started = time.monotonic()
    while time.monotonic() - started < 0.5:
        re.fullmatch("(a*)*b", "a" * 20)


async def run_in_c(monitor: LoopMonitor) -> None:
    monitor.start()
    try:
        await asyncio.sleep(0.3)  # pacing: the monitor's ticks measured before the stall
        asyncio.get_running_loop().call_soon(regex_in_c)
        await asyncio.sleep(0.8)  # pacing: the stall (0.5 s), then ticks after it
    finally:
        monitor.stop()


def test_a_stall_in_c_code_holding_the_gil_is_named(caplog):
    caplog.set_level(logging.WARNING, "mailhub.loop")
    asyncio.run(run_in_c(LoopMonitor(threshold=0.2)))
    lines = [line for line in stall_lines(caplog) if "regex_in_c" in line]
    assert lines and "fullmatch" in lines[0] and lines[0].index("fullmatch") < lines[0].index("regex_in_c"), (
        stall_lines(caplog)
    )


def test_a_hang_is_reported_while_it_lasts(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "mailhub.loop")
    monkeypatch.setattr(loop_monitor, "FIRST_HANG_REPORT", 0.4)
    asyncio.run(run_with_monitor(LoopMonitor(threshold=0.1), 1.2))
    lines = stall_lines(caplog)
    hang = [line for line in lines if line.startswith("event loop blocked for")]
    assert hang and "deliberately_blocking" in hang[0], lines
    assert any(line.startswith("event loop stalled 1.") for line in lines), lines


def test_stall_lines_are_rate_limited(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, "mailhub.loop")
    monkeypatch.setattr(loop_monitor, "MAX_LINES_PER_MINUTE", 2)
    stalls = metrics.REGISTRY.get_sample_value("mailhub_event_loop_stalls_total")
    monitor = LoopMonitor(threshold=0.15)
    asyncio.run(run_with_monitor(monitor, 0.3, 0.3, 0.3, 0.3))
    assert len(stall_lines(caplog)) == 2, stall_lines(caplog)
    assert metrics.REGISTRY.get_sample_value("mailhub_event_loop_stalls_total") >= stalls + 4
    # the next minute's first line says how many went unlogged
    monitor._window_start -= 60
    monitor._report("event loop stalled 1.00 s in somewhere")
    assert "earlier stall(s) not logged" in stall_lines(caplog)[-1]


def test_threshold_zero_measures_without_logging(caplog):
    caplog.set_level(logging.WARNING, "mailhub.loop")
    count, _ = lag_counts()
    asyncio.run(run_with_monitor(LoopMonitor(threshold=0), 0.3))
    assert stall_lines(caplog) == []
    assert lag_counts()[0] > count


def test_the_hub_exports_the_lag_histogram(hub):
    url = f"http://127.0.0.1:{hub.ports['metrics']}/metrics"

    def scraped_with_samples() -> str | None:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        family = next(f for f in text_string_to_metric_families(text) if f.name == "mailhub_event_loop_lag_seconds")
        count = next(s.value for s in family.samples if s.name.endswith("_count"))
        return text if count >= 3 else None

    text = wait_for(scraped_with_samples, interval=0.1, message="3 samples in the lag histogram")
    assert "mailhub_event_loop_stalls_total" in text
