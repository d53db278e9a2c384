"""The whole product in a real browser: Debian's Chromium driven by Playwright against
the dashboard started as the README starts it (`python serve.py`), on a free port, with its own
data root and runs folder (conftest.dashboard_server, one for every browser test file).

Screenshots of every step go to $TUNEBOARD_SCREENSHOTS (default: artifacts/e2e). The README's
pictures are made with:  TUNEBOARD_SCREENSHOTS=docs/screenshots python -m pytest tests/test_e2e_browser.py

One server and one browser for the browser files; every wait is on something the page shows, never a
fixed sleep (bar the 0.1 s Streamlit's own browser tests allow a widget change to reach the server).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

import conftest
from conftest import ROOT, TINY_BACKBONE, make_dataset, write_image
from finetune_core import memory
from finetune_core.runs import RunDir

CHROMIUM, FLAGS = conftest.CHROMIUM, conftest.CHROMIUM_FLAGS  # benchmarks/bench_tabs.py imports them from here
chromium_or_skip, free_port = conftest.chromium_or_skip, conftest.free_port
pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def server(dashboard_server):
    """The session's dashboard (conftest.dashboard_server, shared with the other browser files) with
    this test's dataset: 100 training images per class at batch 2, long enough to watch the curves
    grow."""
    shapes = dashboard_server["data"] / "shapes"
    if not shapes.exists():
        make_dataset(shapes, classes=("red", "blue"), per_class=100, test_per_class=10, size=(48, 48))
    return dashboard_server


@pytest.fixture
def browser_page(chromium_page):
    """The session's Chromium page (conftest.chromium_page)."""
    return chromium_page


@pytest.fixture(autouse=True)
def screenshot_on_failure(request):
    """What the page showed when a test gave up: artifacts/e2e/failed-<test>.png. The page is asked for
    before the test runs (asked for in teardown, pytest had already torn it down: an error on top of the
    failure, and no screenshot)."""
    page = request.getfixturevalue("browser_page") if "browser_page" in request.fixturenames else None
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and page is not None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"failed-{request.node.name}.png"))


SHOTS = Path(os.environ.get("TUNEBOARD_SCREENSHOTS", ROOT / "artifacts" / "e2e"))


def shot(page, name: str, scroll_to: str | None = None) -> None:
    """A screenshot of what the user sees (Streamlit scrolls inside its own container, so scroll the
    part that matters into view first)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    if scroll_to:
        page.get_by_text(scroll_to, exact=True).first.scroll_into_view_if_needed()
        page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]')?.scrollBy(0, -20)")
    page.wait_for_timeout(150)  # one frame for the scroll to be drawn
    page.screenshot(path=str(SHOTS / f"{name}.png"))


# Only the live curves (the Data section's class-count chart has points from the start), and only
# the named run's traces (right after Train the chart still shows the previous run's).
LIVE = ".st-key-live_curves .js-plotly-plot"


def points_js(run_name: str) -> str:
    return f"""Array.from(document.querySelectorAll('{LIVE}'))
        .map(gd => (gd._fullData || []).filter(t => t.name === '{run_name}')
                                       .reduce((n, t) => n + (t.x ? t.x.length : 0), 0))
        .reduce((a, b) => a + b, 0)"""


def plotted_points(page, run_name: str) -> int:
    """How many points the live curves hold for one run right now (read from the page's charts)."""
    return page.evaluate(f"() => {points_js(run_name)}")


IDLE = "[data-testid='stApp'][data-test-script-state='notRunning'][data-test-connection-state='CONNECTED']"


IDLE_TIMEOUT_MS = 60_000  # benchmarks/bench_tabs.py waits longer, for a loaded machine


def wait_idle(page) -> None:
    """Until Streamlit has finished the script run the last action started (as Streamlit's own
    browser tests wait: a tenth of a second for the change to reach the server, then the state)."""
    page.wait_for_timeout(100)
    page.wait_for_selector(IDLE, timeout=IDLE_TIMEOUT_MS)


def fill(page, label: str, value: str) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(value)
    box.press("Enter")
    wait_idle(page)


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the select box labelled `label` (typed, as a user can, so that the option
    is in the list whatever its length)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.get_by_role("combobox", name=label, exact=True)
    for attempt in range(3):  # a rerun of the page that lands meanwhile closes an open list: open it again
        if box.input_value() == option:
            return
        box.click()
        box.fill(option)
        try:
            page.get_by_role("option", name=option, exact=True).click(timeout=15_000)
            return
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.keyboard.press("Escape")
            wait_idle(page)
    wait_idle(page)


def open_setup(page) -> None:
    page.get_by_role("tab", name="Setup").click()  # after Train, the page shows the Live tab
    wait_idle(page)


def set_recipe(page, server, name: str, param_groups: bool, epochs: int, browse: bool = False) -> None:
    """The tiny test backbone (random init, every layer): a run of 200 images at 64 px takes
    seconds, not the minutes EfficientNet-Lite0 took on a busy 2-core machine."""
    open_setup(page)
    page.get_by_text("A folder path", exact=True).click()
    wait_idle(page)
    if browse:  # the folder browser: pick a sub-folder of the data folder, then "Use this folder"
        page.get_by_text(f"Browse {server['data']}", exact=False).click()
        page.get_by_role("combobox", name="Sub-folder", exact=True).wait_for()
        page.wait_for_selector(IDLE)  # the run that drew the folder box has ended: the list stays open
        choose(page, "Sub-folder", "shapes")
        page.get_by_role("button", name="Use this folder", exact=True).click()
        from playwright.sync_api import expect

        expect(page.get_by_label("Folder", exact=True)).to_have_value(str((server["data"] / "shapes").resolve()))
        wait_idle(page)
    else:
        fill(page, "Folder", str(server["data"] / "shapes"))
    page.get_by_text("Training images", exact=True).wait_for()
    choose(page, "Backbone", f"{TINY_BACKBONE} (weights need a download)")
    page.get_by_text("none (random init)", exact=True).click()
    wait_idle(page)
    fill(page, "Learning rate", "0.002")
    fill(page, "Head learning-rate multiplier", "5")
    choose(page, "Trainable part", "every layer (the book)")
    fill(page, "Image size (px)", "64")
    fill(page, "Batch size", "2")
    set_run(page, name, param_groups, epochs)


def set_run(page, name: str, param_groups: bool, epochs: int) -> None:
    """What differs between the test's two runs."""
    groups = page.get_by_role("checkbox", name="Parameter groups (head at lr × multiplier)", exact=True)
    if groups.is_checked() != param_groups:
        groups.set_checked(param_groups, force=True)
        wait_idle(page)
    fill(page, "Epochs", str(epochs))
    fill(page, "Run name", name)


def train(page, name: str) -> None:
    """Press Train: the page turns to its Live tab and stays there once the run shows in the live
    view (it used to jump back to Setup a moment later: the "Queued" message drawn above the tabs
    shifted them, and the browser drew them anew on their first tab). The waits that follow look
    for the run's state among the visible elements, which a jump back to Setup would hide."""
    import re

    page.get_by_role("button", name="Train", exact=True).click()
    live = page.locator("[role=tab][aria-selected=true]", has_text="Live")
    live.wait_for()
    page.get_by_text(re.compile(f"^{name} (running|completed)")).filter(visible=True).first.wait_for()
    wait_idle(page)
    assert live.count() == 1, "the Train page went back from Live to Setup after Train"


def only_run_named(runs_dir, name: str):
    from finetune_core.runs import list_runs

    runs = [i for i in list_runs(runs_dir) if i.name == name]
    assert len(runs) == 1, [(i.name, i.id) for i in list_runs(runs_dir)]
    return runs[0]


def selected_run(page, runs_dir):
    """The run the Predict page shows (its id ends the selected option's text)."""
    from finetune_core.runs import list_runs

    shown = page.get_by_role("combobox", name="Run", exact=True).input_value()
    matches = [i for i in list_runs(runs_dir) if shown.strip().endswith(i.id)]
    assert len(matches) == 1, (shown, [i.id for i in list_runs(runs_dir)])
    return matches[0]


def test_the_dashboard_end_to_end(server, browser_page):
    page, url = browser_page, server["url"]

    # 1. The home page loads.
    page.goto(url)
    page.get_by_text("Quick start").wait_for()
    page.get_by_text("Backbones with weights offline").wait_for()
    # the first session after a start lists app.py's pages (serve.py), not the pages/ folder's "app"
    assert page.locator('[data-testid="stSidebarNav"]').inner_text().split()[:2] == ["home", "Home"]
    if memory.supported():  # serve.py started the server with glibc's fast malloc settings
        page.get_by_text("glibc keeps freed memory").wait_for()
        assert page.get_by_text("started without Tuneboard's memory settings").count() == 0
    shot(page, "01-home")

    # 2. Train: a small dataset, a learning rate and head multiplier, a tiny run; watch it grow.
    page.goto(f"{url}/Train")
    page.get_by_text("1 · Data").wait_for()
    # More epochs than the test watches (about 1 s each on a quiet machine; the test stops the run):
    # it must outlast two refreshes of the curves (6 s each) and a reload.
    set_recipe(page, server, "e2e-groups", param_groups=True, epochs=60, browse=True)
    train(page, "e2e-groups")
    page.get_by_text("e2e-groups running").filter(visible=True).first.wait_for()
    page.wait_for_function(f"() => ({points_js('e2e-groups')}) >= 2", timeout=120_000)  # the first batches
    first = plotted_points(page, "e2e-groups")
    # Two looks at the live chart: it must hold more points later, while the run is still going.
    page.wait_for_function(f"() => ({points_js('e2e-groups')}) > {first}", timeout=60_000)
    second = plotted_points(page, "e2e-groups")
    shot(page, "02-train-live", scroll_to="3 · Live")
    assert second > first, f"the live curves did not grow ({first} -> {second} points)"
    assert page.get_by_text("e2e-groups running").first.is_visible()

    # 6. Reload mid-run: a new session finds the same job, still running, and stops it.
    page.reload()
    page.get_by_text("e2e-groups running").filter(visible=True).first.wait_for()
    shot(page, "03-train-after-reload", scroll_to="3 · Live")
    # 3. The job's own Stop (Streamlit's toolbar has a Stop button too, for the script run).
    page.locator("[class*='st-key-live-stop-'] button").first.click()
    page.get_by_text("e2e-groups stopped").filter(visible=True).first.wait_for(timeout=60_000)
    shot(page, "05-train-stopped", scroll_to="3 · Live")

    # 2b. A second run without parameter groups (the reload began a new session: the form is set
    # again), short enough to be waited for to its end.
    set_recipe(page, server, "e2e-single", param_groups=False, epochs=3)
    train(page, "e2e-single")
    page.get_by_text("e2e-single completed").filter(visible=True).first.wait_for(timeout=180_000)
    # The curves (refreshed less often than the state above them) catch up with the whole run: a
    # point a batch in the train loss and accuracy, one an epoch in the test accuracy.
    batches = int((RunDir(only_run_named(server["runs"], "e2e-single").path).read_metrics()["kind"] == "batch").sum())
    page.wait_for_function(f"() => ({points_js('e2e-single')}) >= {2 * batches + 3}", timeout=30_000)
    shot(page, "04-train-completed", scroll_to="3 · Live")
    page.set_viewport_size({"width": 400, "height": 900})  # a phone
    shot(page, "04b-train-phone", scroll_to="3 · Live")
    page.set_viewport_size({"width": 1400, "height": 1000})
    for name, groups, epochs in (("e2e-groups", True, 60), ("e2e-single", False, 3)):  # the form reached the runs
        recipe = RunDir(only_run_named(server["runs"], name).path).read_config()["config"]
        assert (recipe["backbone"], recipe["weights"], recipe["train_stages"], recipe["image_size"],
                recipe["batch_size"], recipe["lr"], recipe["head_lr_mult"], recipe["param_groups"],
                recipe["epochs"]) == (TINY_BACKBONE, "none", "all", 64, 2, 0.002, 5, groups, epochs), (name, recipe)

    # 4. Compare: both runs overlaid.
    page.goto(f"{url}/Compare")
    page.get_by_text("Compare runs").wait_for()
    names_js = """() => Array.from(new Set(Array.from(document.querySelectorAll('.js-plotly-plot'))
        .flatMap(gd => (gd.data || []).map(t => t.name))))"""
    page.wait_for_function(f"() => ({names_js})().length >= 2")
    names = page.evaluate(names_js)
    assert {"e2e-groups", "e2e-single"} <= set(names), names
    shot(page, "06-compare")

    # 5. Predict: drop an image, then a text file.
    page.goto(f"{url}/Predict")
    page.get_by_text("of the kept model").first.wait_for()
    wait_idle(page)  # the page's whole run first: a file set while it still draws can land in an element it replaces
    page.get_by_role("tab", name="Classify your images").click()
    image = write_image(server["tmp"] / "a_red_thing.png", (220, 40, 40), (64, 64), noise=20)
    uploader = page.locator(".st-key-classify_upload input[type=file]")
    uploader.set_input_files(str(image))
    page.get_by_text("a_red_thing.png:", exact=False).wait_for()
    answer = page.get_by_text("a_red_thing.png:", exact=False).inner_text()
    from finetune_core.predict import Predictor

    run = selected_run(page, server["runs"])
    best, probability = Predictor.from_run(run.path).predict_files([image], top_k=1)[0].top[0]
    other = ({"red", "blue"} - {best}).pop()
    assert best in answer and other not in answer.replace("a_red_thing", ""), (answer, run.name, best)
    assert f"{probability:.1%}" in answer, (answer, probability)
    shot(page, "07-predict")
    notes = server["tmp"] / "notes.txt"
    notes.write_text("this is not an image")
    uploader.set_input_files(str(notes))
    page.get_by_text("not an image that can be read", exact=False).wait_for()
    shot(page, "08-predict-not-an-image")


def test_the_page_and_its_charts_follow_the_browsers_light_or_dark_setting(server, browser_page):
    """A browser that prefers dark gets the dark theme (it was pinned to light), one that prefers
    light the light one (the chart palette reads on both: tests/test_plots.py)."""
    from finetune_core import plots  # the backgrounds the palette's contrast is checked against

    def luminance(rgb: str) -> float:
        r, g, b = (int(v) / 255 for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    backgrounds = {}
    browser = browser_page.context.browser  # the module's browser: one Playwright per process
    for scheme in ("dark", "light"):
        page = browser.new_page(viewport={"width": 1200, "height": 900}, color_scheme=scheme)
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        page.get_by_text("Quick start").wait_for()
        wait_idle(page)
        backgrounds[scheme] = page.evaluate(
            "() => getComputedStyle(document.querySelector('[data-testid=\"stApp\"]')).backgroundColor")
        shot(page, f"theme-{scheme}")
        page.close()
    assert luminance(backgrounds["dark"]) < 0.2 < 0.8 < luminance(backgrounds["light"]), backgrounds
    for scheme, color in plots.THEME_BACKGROUNDS.items():
        h = color.lstrip("#")
        assert backgrounds[scheme] == f"rgb({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)})"
