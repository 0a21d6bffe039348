"""Headless Chromium for integration tests: the Debian package `chromium` (/usr/bin/chromium) driven by playwright.

Playwright's own browser downloads are never used: the browser is launched with executable_path=/usr/bin/chromium
(override with DEITLAB_CHROMIUM). The machine has no internet, so Chromium's background networking (component
updates, sync, QUIC probes, first-run fetches) is switched off; otherwise it floods the log with refused connections.

    from browser import check_mlflow_experiment_page, chromium_available, chromium_page, open_and_screenshot
"""
from __future__ import annotations

import importlib.util
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CHROMIUM = os.environ.get("DEITLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}


def chromium_available() -> str | None:
    """None when headless Chromium can be driven here, else a one-line reason to skip."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium not found at {CHROMIUM} (Debian package chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the Python package playwright is not installed (test extra)"
    return None


@contextmanager
def chromium_page(viewport: dict | None = None, init_script: str | None = None) -> Iterator:
    """A fresh headless Chromium (own profile, nothing shared between calls) and one page in it."""
    from playwright.sync_api import sync_playwright

    reason = chromium_available()
    if reason:
        raise RuntimeError(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context(viewport=viewport or VIEWPORT)
            if init_script:
                context.add_init_script(init_script)
            page = context.new_page()
            page.set_default_timeout(120_000)  # two loaded cores: the UI is 4 MB of JS
            yield page
        finally:
            browser.close()


def visible_text(page, limit: int = 1500) -> str:
    """The page's visible text, whitespace squeezed, cut to `limit` characters (for failure messages)."""
    try:
        text = page.locator("body").inner_text(timeout=5_000)
    except Exception as exc:  # noqa: BLE001 - only for a message
        return f"(could not read the page text: {exc})"
    text = re.sub(r"\s*\n\s*", " | ", text.strip())
    return text if len(text) <= limit else text[:limit] + " …"


def wait_for_texts(page, texts: list[str], timeout_s: float = 30.0, what: str = "page") -> None:
    """Wait until every text in `texts` is visible on `page` (exact match of an element's text); AssertionError
    naming the missing ones and what the page showed otherwise."""
    deadline = time.monotonic() + timeout_s
    missing = list(texts)
    while True:
        missing = [text for text in missing if not _text_visible(page, text)]
        if not missing or time.monotonic() > deadline:
            break
        page.wait_for_timeout(250)
    if missing:
        raise AssertionError(f"{what} ({page.url}): not visible after {timeout_s:.0f} s: {missing}; "
                             f"the page shows: {visible_text(page)}")


def _text_visible(page, text: str) -> bool:
    locator = page.get_by_text(text, exact=True)
    try:
        return any(locator.nth(i).is_visible() for i in range(min(locator.count(), 20)))
    except Exception:  # noqa: BLE001 - the page is re-rendering; try again
        return False


_LOADING_JS = """() => [...document.querySelectorAll('[aria-busy="true"], span, div')].some(e =>
    e.getAttribute('aria-busy') === 'true' ||
    (e.childElementCount === 0 && /(^|\\s)loading(\\.{3}|…)?$/i.test((e.textContent || '').trim())))"""


def settle(page, timeout_s: float = 5.0) -> bool:
    """Wait (at most `timeout_s`, never failing) until no loading placeholder is left: elements with aria-busy, or a
    leaf whose text ends in "loading" (MLflow's skeletons carry screen-reader text such as "Parent run name
    loading"). True when the page settled."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if not page.evaluate(_LOADING_JS):
                return True
        except Exception:  # noqa: BLE001 - navigating; try again
            pass
        page.wait_for_timeout(100)
    return False


def screenshot(page, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


def open_and_screenshot(url: str, texts: list[str], screenshot_path: str | Path, timeout_s: float = 30.0,
                        page=None) -> Path:
    """Open `url` (in `page`, else in a fresh headless Chromium), wait until every text in `texts` is visible and
    save a full-page screenshot to `screenshot_path` (also on failure, then re-raise)."""
    if page is None:
        with chromium_page() as own_page:
            return open_and_screenshot(url, texts, screenshot_path, timeout_s, own_page)
    page.goto(url)
    try:
        wait_for_texts(page, texts, timeout_s, what=url)
        settle(page)
    finally:
        screenshot(page, screenshot_path)
    return Path(screenshot_path)


# ---------------------------------------------------------------------------------------------------------------
# MLflow 3.17 UI
# ---------------------------------------------------------------------------------------------------------------
# MLflow 3 opens experiments in its "GenAI" workflow (traces overview) unless told otherwise: the runs table is the
# "Model training" workflow. The ?workflowType=machine_learning URL parameter selects it for one page; the same
# choice in localStorage (what the sidebar's GenAI / Model training switch writes) keeps it on the run pages. The
# MLflow Assistant side panel opens by itself on first load and eats a third of the width: stored as closed.
_MLFLOW_INIT_SCRIPT = """
try {
  localStorage.setItem('mlflow.workflowType_v1', JSON.stringify('machine_learning'));
  localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
  localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
} catch (e) {}
"""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _close_assistant(page) -> None:
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    try:
        if close.count() and close.first.is_visible():
            close.first.click(timeout=2_000)
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _rows(page) -> list[str]:
    """Run names in the runs table's pinned run-name column, top to bottom."""
    return page.locator('[role="gridcell"][col-id*="Run Name"]').evaluate_all(
        "cells => cells.map(c => c.innerText.trim().split('\\n').pop())")


def _expand_parents(page, names: list[str], timeout_s: float) -> None:
    """Child runs are nested under their parent and collapsed: click the +/- expander in the run-name cell of each
    row that has one (once per row, re-clicked if that collapsed rows instead) until every name in `names` shows."""
    clicked: set[str] = set()
    deadline = settle_until = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(_text_visible(page, name) for name in names):
            return
        expanders = page.locator('[role="row"][row-id]:has([role="gridcell"][col-id*="Run Name"] button)')
        pending = [row for row in expanders.all() if row.get_attribute("row-id") not in clicked]
        if not pending:
            if clicked and time.monotonic() > settle_until:
                # Every expander clicked, the names still missing: a click may have collapsed a row that was
                # expanding slowly. Click them all again (until the deadline; the caller reports what is missing).
                clicked.clear()
                settle_until = time.monotonic() + 3
            page.wait_for_timeout(250)  # rows may still be loading
            continue
        row = pending[0]
        before = len(_rows(page))
        clicked.add(row.get_attribute("row-id"))
        button = row.locator('[role="gridcell"][col-id*="Run Name"] button').first
        button.click()
        page.wait_for_timeout(300)
        if len(_rows(page)) < before:  # it was expanded already: undo
            button.click()
            page.wait_for_timeout(300)
        settle_until = time.monotonic() + 3


def _show_tag_column(page, tag_key: str, timeout_s: float) -> None:
    """Columns selector → search the tag key → tick it (a tree of checkboxes: clicking the title ticks it)."""
    page.get_by_role("button", name=re.compile(r"^\s*Columns\s*$")).click()
    search = page.get_by_placeholder("Search columns")
    search.fill(tag_key)
    entry = page.locator(f'[title="{tag_key}"]').first
    entry.wait_for(state="visible", timeout=timeout_s * 1000)
    entry.click()
    page.keyboard.press("Escape")


def _column_values(page, header_text: str, expected: list[str], timeout_s: float) -> tuple[list[str], object]:
    """The texts of the column whose header reads `header_text` (scrolled into view first: ag-grid renders only the
    columns near the viewport), read again until they include every `expected` value or `timeout_s` passes; and its
    header locator."""
    deadline = time.monotonic() + timeout_s
    header = page.locator('[role="columnheader"][col-id]', has_text=header_text).first
    header.wait_for(state="attached", timeout=timeout_s * 1000)
    header.scroll_into_view_if_needed()
    cells = page.locator(f'[role="gridcell"][col-id="{header.get_attribute("col-id")}"]')
    while True:
        values = [text.strip() for text in cells.all_inner_texts()]
        if all(value in values for value in expected) or time.monotonic() > deadline:
            return values, header
        page.wait_for_timeout(250)  # cells render after the column is added


def check_mlflow_experiment_page(server_uri: str, experiment_id: str, child_run_names: list[str], tag_key: str,
                                 tag_values: list[str], screenshot_dir: str | Path,
                                 timeout_s: float = 120.0) -> dict[str, Path]:
    """Check in the MLflow UI served by `server_uri` that experiment `experiment_id` shows every child run in
    `child_run_names` and that tag `tag_key` takes every value in `tag_values` (the values of those child runs).

    1. Runs table (#/experiments/ID/runs, "Model training" workflow): expand the parent rows until every child run
       name is visible; add `tag_key` as a column through the Columns selector; every value must be in that column.
       Screenshot: experiment-ID-runs.png.
    2. Each child run's page (through the href of its name's link in the table): its name and, in its Tags section,
       `tag_key` with one of `tag_values`; together the run pages must show every value.
       Screenshots: run-NAME.png.
    Returns {"experiment": path, "run:NAME": path, ...}. AssertionError (with what was visible) on failure; a
    screenshot is saved also then.
    """
    screenshot_dir = Path(screenshot_dir)
    base = server_uri.rstrip("/")
    shots: dict[str, Path] = {}
    with chromium_page(init_script=_MLFLOW_INIT_SCRIPT) as page:
        page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        experiment_shot = screenshot_dir / f"experiment-{_safe_name(experiment_id)}-runs.png"
        try:
            try:
                page.locator('[role="gridcell"][col-id*="Run Name"]').first.wait_for(
                    state="visible", timeout=timeout_s * 1000)
            except Exception as exc:  # noqa: BLE001
                raise AssertionError(f"MLflow runs table did not appear at {page.url}: {exc}; the page shows: "
                                     f"{visible_text(page)}") from None
            _close_assistant(page)
            _expand_parents(page, child_run_names, timeout_s)
            missing = [name for name in child_run_names if not _text_visible(page, name)]
            if missing:
                raise AssertionError(f"MLflow runs table: child runs {missing} not visible after expanding parent "
                                     f"runs; rows: {_rows(page)}; the page shows: {visible_text(page)}")
            _show_tag_column(page, tag_key, timeout_s)
            values, header = _column_values(page, tag_key, tag_values, timeout_s)
            missing = [value for value in tag_values if value not in values]
            if missing:
                raise AssertionError(f"MLflow runs table: column {tag_key!r} lacks {missing}; it shows {values} "
                                     f"for rows {_rows(page)}")
            header.scroll_into_view_if_needed()
            settle(page)
        finally:
            shots["experiment"] = screenshot(page, experiment_shot)

        hrefs = {}
        for name in child_run_names:
            link = page.get_by_role("link", name=name, exact=True).first
            hrefs[name] = link.get_attribute("href")
        seen_values: set[str] = set()
        for name, href in hrefs.items():
            url = href if href and href.startswith("http") else f"{base}/{(href or '').lstrip('/')}"
            # The run links are hash routes: going there from the runs table would keep its DOM (a column header
            # named like the tag) until React re-renders. From a blank page only the run page can match.
            page.goto("about:blank")
            page.goto(url)
            run_shot = screenshot_dir / f"run-{_safe_name(name)}.png"
            try:
                wait_for_texts(page, [name, tag_key], timeout_s, what=f"MLflow run page of {name!r}")
                settle(page)
                deadline = time.monotonic() + timeout_s
                while True:  # the tag's value renders with its key, or just after it
                    chip = page.get_by_text(tag_key, exact=True).first.locator("xpath=..")
                    chip_text = chip.inner_text().replace("\n", " ")
                    shown = [value for value in tag_values if re.search(rf":\s*{re.escape(value)}\s*$", chip_text)]
                    if shown or time.monotonic() > deadline:
                        break
                    page.wait_for_timeout(250)
                if not shown:
                    raise AssertionError(f"MLflow run page of {name!r}: tag shows {chip_text!r}, none of "
                                         f"{tag_values}; the page shows: {visible_text(page)}")
                seen_values.update(shown)
            finally:
                shots[f"run:{name}"] = screenshot(page, run_shot)
        missing = [value for value in tag_values if value not in seen_values]
        if missing:
            raise AssertionError(f"MLflow run pages of {list(hrefs)}: tag {tag_key!r} never showed {missing} "
                                 f"(saw {sorted(seen_values)})")
    return shots


def _group_by(page, key: str, timeout_s: float) -> None:
    """Group by → search `key` → tick it (a menu of checkboxes: attributes, datasets, tags, params)."""
    page.get_by_role("button", name=re.compile(r"Group by")).click()
    page.get_by_placeholder("Search").last.fill(key)
    item = page.get_by_role("menuitemcheckbox").filter(has_text=re.compile(rf"^{re.escape(key)}$")).first
    item.wait_for(state="visible", timeout=timeout_s * 1000)
    item.click()
    page.keyboard.press("Escape")


_GROUP = re.compile(r"^(?:Group: (?P<value>.+?)|(?P<rest>Additional runs))\s*\n\s*(?P<count>\d+)\b", re.M)


def _groups(page) -> dict[str, int]:
    """The group rows of the runs table: {value: number of runs}; runs without the key under "Additional runs"."""
    found = {}
    for text in page.locator('[role="row"][row-id]').all_inner_texts():
        for match in _GROUP.finditer(text.replace("Pin group", "").strip()):
            found[match["value"] or match["rest"]] = int(match["count"])
    return found


def _wait_for_groups(page, expected: dict[str, int], timeout_s: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        shown = {k: v for k, v in _groups(page).items() if k != "Additional runs"}
        if shown == expected or time.monotonic() > deadline:
            return shown
        page.wait_for_timeout(250)


def check_mlflow_teacher_comparison(server_uri: str, experiment_id: str, groups: dict[str, int], run_name: str,
                                    datasets: list[str], versions: list[tuple[str, str]], card_keys: list[str],
                                    screenshot_dir: str | Path, timeout_s: float = 120.0) -> dict[str, Path]:
    """What a user comparing teachers clicks through in the MLflow UI served by `server_uri`:

    1. The experiment's runs table, grouped by the tag deitlab.teacher (Group by): the groups and their sizes must be
       `groups` (the runs without the tag, a sweep's parent, are "Additional runs"). Screenshot: teachers-grouped.png.
    2. The chart view of the grouped runs: one curve per group of the metric `acc`, its legend "GROUP (acc)" for
       every group. Screenshot: teachers-grouped-charts.png.
    3. The run page of `run_name`: its datasets (`datasets`, in the Datasets box) and its logged model best_model.
       Screenshot: run-with-model.png.
    4. Each registered teacher version (name, version) in `versions`: its page shows the card (`card_keys` among its
       tags) and links its source model; that logged model's page shows its metric acc, the dataset it was measured
       on and the version it is registered as. Screenshots: version-NAME-V.png, model-NAME-V.png.
    Returns the screenshots by name; AssertionError with what the page showed otherwise (a screenshot is saved then).
    """
    screenshot_dir = Path(screenshot_dir)
    base = server_uri.rstrip("/")
    shots: dict[str, Path] = {}
    with chromium_page(init_script=_MLFLOW_INIT_SCRIPT) as page:
        page.goto(f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
        try:
            page.locator('[role="gridcell"][col-id*="Run Name"]').first.wait_for(
                state="visible", timeout=timeout_s * 1000)
            _close_assistant(page)
            _group_by(page, "deitlab.teacher", timeout_s)
            shown = _wait_for_groups(page, groups, timeout_s)
            if shown != groups:
                raise AssertionError(f"MLflow runs grouped by deitlab.teacher: groups {shown}, expected {groups}; "
                                     f"the page shows: {visible_text(page)}")
            wait_for_texts(page, [run_name], timeout_s, what="the grouped runs table")
            href = page.get_by_role("link", name=run_name, exact=True).first.get_attribute("href")
            settle(page)
        finally:
            shots["grouped"] = screenshot(page, screenshot_dir / "teachers-grouped.png")
        try:
            page.locator('label:has(input[name="runs-view-mode"][value="CHART"])').click()
            wait_for_texts(page, [f"{group} (acc)" for group in groups], timeout_s, what="the chart view")
            settle(page)
        finally:
            shots["charts"] = screenshot(page, screenshot_dir / "teachers-grouped-charts.png")

        page.goto("about:blank")  # a hash route: from a blank page only the run page can match
        page.goto(href if href and href.startswith("http") else f"{base}/{(href or '').lstrip('/')}")
        try:
            wait_for_texts(page, [run_name, "Logged models (1)", "best_model"], timeout_s, what=f"run page {run_name}")
            for dataset in datasets:  # shown as "NAME (DIGEST)" in the Datasets box
                page.get_by_text(re.compile(rf"^{re.escape(dataset)} \(")).first.wait_for(timeout=timeout_s * 1000)
            settle(page)
        finally:
            shots["run"] = screenshot(page, screenshot_dir / "run-with-model.png")

        for name, version in versions:
            page.goto("about:blank")
            page.goto(f"{base}/#/models/{name}/versions/{version}")
            safe = f"{_safe_name(name)}-{version}"
            try:
                wait_for_texts(page, [f"Version {version}", "Source Model", *card_keys], timeout_s,
                               what=f"registry version {name}/{version}")
                link = page.locator('a[href*="/models/m-"]').first
                link.wait_for(state="visible", timeout=timeout_s * 1000)
                settle(page)
            finally:
                shots[f"version:{name}"] = screenshot(page, screenshot_dir / f"version-{safe}.png")
            link.click()
            try:
                wait_for_texts(page, ["acc", "Model versions", name, f"v{version}"], timeout_s,
                               what=f"the logged model of {name}/{version}")
                page.get_by_text(re.compile(r"^Metrics \(\d+\)$")).first.wait_for(timeout=timeout_s * 1000)
                settle(page)
            finally:
                shots[f"model:{name}"] = screenshot(page, screenshot_dir / f"model-{safe}.png")
    return shots


def png_ok(path: str | Path) -> bool:
    """A non-empty PNG file."""
    path = Path(path)
    return path.is_file() and path.stat().st_size > 100 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


__all__ = ["CHROMIUM", "CHROMIUM_FLAGS", "check_mlflow_experiment_page", "check_mlflow_teacher_comparison",
           "chromium_available", "chromium_page",
           "open_and_screenshot", "png_ok", "screenshot", "settle", "visible_text", "wait_for_texts"]
