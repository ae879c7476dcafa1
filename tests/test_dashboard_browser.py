"""The fleet dashboard in a real headless Chromium: every chart renders with data, offline,
without console errors; a screenshot is kept in the pytest tmp dir and .artifacts/."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tensorslm.fleet.central_db import CentralDB
from tensorslm.fleet.dashboard import DASHBOARD_SLUG, PLUGIN, load_metadata, start_dashboard
from tests.brokers import free_port, wait_for_port
from tests.fake_fleet import simulate_fleet

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Without the background-networking flags Chromium's own connections are refused on a closed
# network and reported as console errors.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1400,2200", "--hide-scrollbars"]

# Marks drawn by vega for the data (axes, legends and titles are role-axis/-legend/-title).
MARKS_JS = """
const out = {};
for (const el of document.querySelectorAll('[id^="chart-"]')) {
  const slug = el.id.slice('chart-'.length);
  const svg = el.querySelector('svg');
  const marks = svg ? svg.querySelectorAll(
      'g.role-mark > path, g.role-mark > text, g.role-mark > line, g.role-mark > rect') : [];
  out[slug] = {svg: !!svg, marks: marks.length, text: el.innerText.trim()};
}
return out;
"""


def fill(db_path: Path) -> dict:
    """A central database as the collector would leave it: three devices' records; pi-04, a
    demo-like run of two minutes that drains its battery to 0 %, whose retained telemetry from
    an earlier run (3 % three hours ago) the collector also got; pi-05, online but never sent
    telemetry (battery unknown)."""
    from tests.fake_fleet import simulate_device

    fleet = simulate_fleet(devices=3, queries=40)
    short = simulate_device("pi-04", queries=30, gap_s=4.0, battery=15.0)
    short.telemetry.append({**short.telemetry[-1], "time": short.queries[-1]["finished_at"] + 1,
                            "battery_percent": 0.0})
    stale = {**short.telemetry[0], "time": short.queries[0]["received_at"] - 3 * 3600,
             "battery_percent": 3.0}
    with CentralDB(db_path) as db:
        for fake in [*fleet, short]:
            for message in fake.messages():
                store = db.store_query if message["kind"] == "query" else db.store_switch
                store(message["record"], device=fake.device)
            for telemetry in ([stale] if fake is short else []) + fake.telemetry:
                db.store_telemetry(fake.device, telemetry)
        for device, status in (("pi-01", "online"), ("pi-02", "online"), ("pi-03", "offline"),
                               ("pi-04", "online"), ("pi-05", "online")):
            db.store_status(device, status)
        return {
            "switches": db.count("switches"),
            "tokens_per_joule": len(db.rows("tokens_per_joule")),
            "latency": len(db.rows("latency_percentiles")),
            "devices": 5,
            "device_ids": ["pi-01", "pi-02", "pi-03", "pi-04", "pi-05"],
        }


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """Datasette over a filled central database, shared by the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("dashboard")
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.fail("chromium and chromium-driver are not installed; `make test` installs them")
    db_path = tmp_path / "central.db"
    expected = fill(db_path)
    port = free_port()
    log = open(tmp_path / "datasette.log", "wb")
    proc = start_dashboard(db_path, port=port, workdir=tmp_path / "dash", stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        yield f"http://127.0.0.1:{port}", expected
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_every_chart_renders_with_data_offline(dashboard, browser, tmp_path):
    base, expected = dashboard
    charts = load_metadata("central.db")["plugins"][PLUGIN][DASHBOARD_SLUG]["charts"]
    vega_charts = [slug for slug, chart in charts.items() if chart["library"] == "vega-lite"]
    assert {"fleet", "energy_device", "energy_point", "tokens_per_joule", "latency", "battery",
            "switches"} <= set(vega_charts)

    browser.get(f"{base}/-/dashboards/{DASHBOARD_SLUG}")
    deadline = time.monotonic() + 60
    state: dict = {}
    while time.monotonic() < deadline:
        state = browser.execute_script(MARKS_JS)
        if all(state.get(slug, {}).get("marks", 0) > 0 for slug in vega_charts) and all(
                state.get(slug, {}).get("text") for slug in charts if slug not in vega_charts):
            break
        time.sleep(0.25)
    time.sleep(0.5)   # let the last transitions settle before the screenshot
    state = browser.execute_script(MARKS_JS)

    screenshot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(screenshot))
    artifacts = ROOT / ".artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(screenshot, artifacts / "dashboard.png")

    for slug in vega_charts:
        assert state[slug]["svg"], f"chart {slug} drew no SVG: {state[slug]}"
        assert state[slug]["marks"] > 0, f"chart {slug} has no data marks: {state[slug]}"
    # Counts that follow from the data: one bar per (device, point), one per (point,
    # percentile); a track, a bar and a label per device; a triangle per switch.
    assert state["tokens_per_joule"]["marks"] == expected["tokens_per_joule"]
    assert state["latency"]["marks"] == expected["latency"]
    assert state["fleet"]["marks"] == 3 * expected["devices"]
    assert state["switches"]["marks"] == expected["switches"]
    assert state["online"]["text"] == "4 / 5 online"
    assert state["joules"]["text"].endswith(" J")

    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], json.dumps(errors, indent=1)
    # Offline: every script and stylesheet came from Datasette itself, none from a CDN.
    sources = browser.execute_script(
        "return [...document.querySelectorAll('script[src], link[href]')]"
        ".map(e => e.src || e.href)")
    assert sources and all(src.startswith(base) for src in sources), sources


def test_device_filter_lists_every_device_and_filters_the_charts(dashboard, browser):
    """The device dropdown holds every device of the database (datasette-dashboards runs the
    filter's query and takes its first column); choosing one puts it in the query string and
    every chart then shows that device alone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base, expected = dashboard
    devices = expected["device_ids"]
    wait = WebDriverWait(browser, 60)
    browser.get(f"{base}/-/dashboards/{DASHBOARD_SLUG}")
    select = Select(wait.until(lambda d: d.find_element(By.ID, "device")))
    # The plugin puts a blank option first (no filter); ours, the default, says so in words.
    assert [o.get_attribute("value") for o in select.options] == ["", "all devices", *devices]
    assert select.first_selected_option.text == "all devices"

    chosen = devices[1]                                   # pi-02, online
    select.select_by_value(chosen)
    browser.find_element(By.CSS_SELECTOR, ".dashboard-filters input[type=submit]").click()
    wait.until(lambda d: parse_qs(urlsplit(d.current_url).query).get("device") == [chosen])
    assert parse_qs(urlsplit(browser.current_url).query)["hours"] == ["24"]
    assert Select(browser.find_element(By.ID, "device")).first_selected_option.text == chosen

    def drawn(driver):
        state = driver.execute_script(MARKS_JS)
        ready = all(state.get(slug, {}).get("marks", 0) > 0
                    for slug in ("fleet", "energy_device", "battery")) and state["online"]["text"]
        return state if ready else False

    state = wait.until(drawn)
    # A track, a bar and a label for the one device; its name alone on the axes and legends.
    assert state["fleet"]["marks"] == 3
    assert state["online"]["text"] == "1 / 1 online"
    for slug in ("fleet", "energy_device", "battery", "switches"):
        named = {device for device in devices if device in state[slug]["text"]}
        assert named == {chosen}, f"chart {slug} names {sorted(named)}: {state[slug]['text']!r}"


# Per chart: the labels of each axis, the path of each line, the width of each bar in screen
# pixels (in drawing order: layer by layer) and the text marks.
SHAPES_JS = """
const out = {};
for (const el of document.querySelectorAll('[id^="chart-"]')) {
  const slug = el.id.slice('chart-'.length);
  const axes = [...el.querySelectorAll('g.role-axis')].map(axis => ({
    label: axis.getAttribute('aria-label') || '',
    ticks: [...axis.querySelectorAll('g.role-axis-label text')].map(t => t.textContent)}));
  const lines = [...el.querySelectorAll('g.mark-line.role-mark path')].map(p => p.getAttribute('d'));
  const bars = [...el.querySelectorAll('g.mark-rect.role-mark')].map(
      g => [...g.querySelectorAll('path')].map(p => p.getBBox().width));
  const labels = [...el.querySelectorAll('g.mark-text.role-mark text')].map(t => t.textContent);
  out[slug] = {axes, lines, bars, labels};
}
return out;
"""


def shapes_when_drawn(browser, url: str, charts: tuple[str, ...]) -> dict:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)

    def drawn(driver):
        marks = driver.execute_script(MARKS_JS)
        return all(marks.get(slug, {}).get("marks", 0) > 0 for slug in charts)

    WebDriverWait(browser, 60).until(drawn)
    time.sleep(0.5)
    return browser.execute_script(SHAPES_JS)


def line_points(path: str) -> list[tuple[float, float]]:
    """The vertices of an SVG polyline path ``M x,y L x,y ...`` as vega draws a line mark."""
    import re

    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", path)]
    return list(zip(numbers[0::2], numbers[1::2]))


TIME_CHARTS = ("energy_device", "energy_point", "battery")


def test_time_axes_never_repeat_a_tick_label(dashboard, browser):
    """pi-04's last hour spans two minutes: ticks every few seconds, each labelled apart."""
    base, _ = dashboard
    shapes = shapes_when_drawn(browser, f"{base}/-/dashboards/{DASHBOARD_SLUG}?device=pi-04&hours=1",
                               TIME_CHARTS)
    for slug in TIME_CHARTS:
        time_axes = [a for a in shapes[slug]["axes"] if "time" in a["label"].lower()]
        assert time_axes, f"{slug}: no time axis among {shapes[slug]['axes']}"
        for axis in time_axes:
            ticks = axis["ticks"]
            assert len(ticks) >= 3, f"{slug}: {ticks}"
            assert len(set(ticks)) == len(ticks), f"{slug} repeats tick labels: {ticks}"


def test_battery_lines_break_where_readings_pause_instead_of_rising(dashboard, browser):
    """pi-04's retained 3 % from an earlier run, three hours before its run at 15 % and
    below, is not joined to that run by a rising line; every device drains, so no line rises."""
    base, _ = dashboard
    shapes = shapes_when_drawn(browser, f"{base}/-/dashboards/{DASHBOARD_SLUG}", ("battery",))
    lines = [line_points(d) for d in shapes["battery"]["lines"] if d]
    assert len(lines) >= 4, shapes["battery"]["lines"]
    for points in lines:
        ys = [y for _, y in points]          # screen y grows downwards: battery falling
        rises = [(a, b) for a, b in zip(ys, ys[1:]) if b < a - 0.5]
        assert not rises, f"a battery line rises: {points[:6]} ..."


def test_fleet_bars_show_every_device_at_zero_or_unknown_battery(dashboard, browser):
    base, expected = dashboard
    shapes = shapes_when_drawn(browser, f"{base}/-/dashboards/{DASHBOARD_SLUG}", ("fleet",))
    widths = [width for group in shapes["fleet"]["bars"] for width in group]
    track, level = widths[:expected["devices"]], widths[expected["devices"]:]
    assert len(track) == len(level) == expected["devices"]
    assert all(width > 100 for width in track), track          # the whole battery, pale
    assert sorted(w > 0 for w in level) == [False, False, True, True, True]   # pi-04, pi-05
    labels = shapes["fleet"]["labels"]
    assert any(label.startswith("0.0 % · online") for label in labels), labels
    assert any(label.startswith("battery unknown · online") for label in labels), labels


def test_dashboard_serves_the_central_views(dashboard):
    """The JSON API the charts call answers each chart's SQL (Datasette, no browser)."""
    base, expected = dashboard
    db_name = "central"
    url = f"{base}/{db_name}/point_switches.json?_shape=array"
    with urllib.request.urlopen(url, timeout=10) as response:
        rows = json.load(response)
    assert len(rows) == expected["switches"]
    assert {"device", "time", "from_point", "to_point", "reason"} <= set(rows[0])


def test_time_series_are_bucketed_to_a_bounded_number_of_points(tmp_path):
    """A device with thousands of queries still gives at most ~150 points per series, and the
    bucket means weigh back to the overall mean."""
    from datasette_dashboards import replace_opts_in_query

    from tests.fake_fleet import simulate_device

    fake = simulate_device("pi-42", queries=1500, gap_s=5.0)
    with CentralDB(tmp_path / "central.db") as db:
        for query in fake.queries:
            db.store_query(query)
        charts = load_metadata(db.path)["plugins"][PLUGIN][DASHBOARD_SLUG]["charts"]
        sql = replace_opts_in_query(charts["energy_device"]["query"], {})
        rows = [dict(zip(("device", "time", "energy_j", "queries"), row[:4]))
                for row in db.db.execute(sql).fetchall()]
    answered = [q["energy_j"] for q in fake.queries if q["outcome"] == "ok"]
    assert 100 <= len(rows) <= 151
    assert sum(r["queries"] for r in rows) == len(answered)
    weighted = sum(r["energy_j"] * r["queries"] for r in rows) / len(answered)
    assert weighted == pytest.approx(sum(answered) / len(answered), rel=1e-3)
