"""Shared fixtures: generated image folders, the real datasets beside the project, tiny configs."""
from __future__ import annotations

import functools
import gc
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One intra-op thread for torch here and in every process the tests start (read when torch is
# imported, which is after this). The tests train tiny models: a second OpenMP thread gains little
# on them, and on a shared 2-core machine it costs several times the run (measured: a 2-epoch
# tiny run 1.7-3 s with one thread, 9-14 s with two while other work ran). Set it to run otherwise.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The test suite's tiny backbone (finetune_core.models.TEST_BACKBONE), here and in every process the
# tests start (read when finetune_core.models is imported, which is after this).
os.environ["TUNEBOARD_TEST_BACKBONE"] = "1"
TINY_BACKBONE = "tiny_lite"

DATASETS = Path(os.environ.get("TUNEBOARD_DATASETS", ROOT.parent / "shared" / "datasets"))


# The files that take longest (they start torchrun, the dashboard, a browser, interpreters), handed
# to the two workers first: a file runs whole on one worker (--dist loadfile), and xdist's default
# order (most tests first) left two of them for the end on the same worker, the other idle (a
# measured 87 s of a 12-minute run on a busy machine). Longest first, the short files fill in the
# gaps at the end. pyproject's addopts turn xdist's own reordering off (--no-loadscope-reorder).
LONGEST_FILES = ("test_distributed.py", "test_e2e_browser.py", "test_pages.py", "test_memory.py",
                 "test_compare_predict.py", "test_models.py", "test_processes.py", "test_engine.py")

# The Chromium tests (files named *_browser.py) share one dashboard server and one browser
# (dashboard_server, chromium_page below, built once per worker process): xdist hands them to the
# same worker as one unit (pytest_xdist_make_scheduler), so a second browser file costs its own
# clicks, not a second server and browser start (about 10 s of CPU each on the build machine).
BROWSER_FILE_SUFFIX = "_browser.py"


def pytest_collection_modifyitems(items):
    """LONGEST_FILES first, in that order; every file's tests keep their order."""
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the other files keep pytest's order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown without it (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with every *_browser.py file in one unit: they run on one worker, one after
    the other, on the session's one server and browser. Other --dist modes are xdist's own."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class BrowserFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "the browser tests" if path.endswith(BROWSER_FILE_SUFFIX) else path

    return BrowserFilesTogether(config, log)


def pytest_collection_finish(session):
    """What the test process holds once every test module is imported (torch, timm, Streamlit,
    pandas...: about half a million objects) goes into the collector's permanent generation
    (gc.freeze): a full collection no longer walks it. The engine ends every run with a full
    gc.collect() (a run's model and optimiser, cycles included, before malloc_trim), which walked
    all of it: 0.25 s of CPU a run in a test worker, about as much as a tiny run itself."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After each test (its fixtures torn down): its garbage collected, what it left alive (module
    fixtures, caches) frozen, so that the next test's collections walk only its own objects."""
    yield
    gc.collect()
    gc.freeze()


def pytest_runtest_setup(item):
    """Tests marked `cuda` need a GPU: they skip, saying so, on a machine without one."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU: this machine has none (benchmarks/gpu_check.sh runs these on one)")


def shared_dataset(name: str) -> Path:
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not found at {path} (the shared/datasets folder beside the project)")
    return path


def write_image(path: Path, color=(200, 30, 30), size=(40, 32), mode="RGB", fmt=None, noise=0, seed=0) -> Path:
    """A real image file: a solid colour with optional noise, in any mode and format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = np.empty((size[1], size[0], 3), dtype=np.int16)
    arr[:] = color
    if noise:
        arr += rng.integers(-noise, noise + 1, size=arr.shape, dtype=np.int16)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_dataset(root: Path, classes=("cat", "dog"), per_class=6, test_per_class=3, size=(40, 32),
                 split_names=("train", "test"), flat=False, noise=20) -> Path:
    """A learnable dataset: each class its own colour (with noise)."""
    colors = [(220, 40, 40), (40, 60, 220), (40, 200, 60), (230, 200, 40)]
    for k, c in enumerate(classes):
        color = colors[k % len(colors)]
        if flat:
            for i in range(per_class + test_per_class):
                write_image(root / c / f"{c}_{i}.png", color, size, noise=noise, seed=k * 1000 + i)
        else:
            for i in range(per_class):
                write_image(root / split_names[0] / c / f"{c}_{i}.png", color, size, noise=noise, seed=k * 1000 + i)
            for i in range(test_per_class):
                write_image(root / split_names[1] / c / f"{c}_t{i}.png", color, size, noise=noise,
                            seed=k * 1000 + 500 + i)
    return root


def make_tiny_dataset(root: Path) -> Path:
    """Two colours, 12 training and 4 test images each: learnable in a couple of epochs."""
    return make_dataset(root, per_class=12, test_per_class=4)


def tiny_train_config(data: Path, **changes):
    """Settings that train in well under a second: the tiny test backbone (random init, 37 k
    parameters, checkpoints of a few kB; backbone="resnet18" where a test is about ResNet-18) at
    32 px. On the CPU even where a GPU is present, so that what the tests see (the run's device,
    its speed, where a stop lands) is the same on every machine."""
    from finetune_core.config import TrainConfig

    return TrainConfig(data=str(data), backbone=TINY_BACKBONE, weights="none", image_size=32, batch_size=8,
                       epochs=2, lr=0.01, loss_reduction="mean", eval_batch_size=16, device="cpu").replace(**changes)


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_tiny_dataset(tmp_path / "tiny")


@pytest.fixture
def tiny_config(tiny_dataset):
    return tiny_train_config(tiny_dataset)


@pytest.fixture
def cache_dir(tmp_path) -> str:
    return str(tmp_path / "cache")


# --- the dashboard through AppTest ---------------------------------------------------------------

PAGE_TIMEOUT = 120


def link_tree(source: Path, target: Path) -> Path:
    """A copy of a folder whose files are hard links (copies where links cannot be made): for
    files that are only read or replaced, never changed in place."""
    def link(src, dst):
        try:
            os.link(src, dst)
            return dst
        except OSError:
            return shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)
    return target


@pytest.fixture(scope="session")
def example_digits(tmp_path_factory) -> Path:
    """The built-in example (1,797 digit images), written once for the session: writing it takes
    seconds, a linked copy a tenth of one."""
    from finetune_core import datastore

    return datastore.ensure_example_dataset(tmp_path_factory.mktemp("example"))


@pytest.fixture
def dashboard_env(tmp_path, monkeypatch, example_digits):
    """A private data root, runs folder and decode cache for the pages under test, and an empty
    torch hub: what the pages offer must not depend on weights cached on this machine. The data
    root already holds the example (linked from the session's copy), as after the first visit to
    Train, where it is the default data source."""
    link_tree(example_digits, tmp_path / "data" / example_digits.name)
    monkeypatch.setenv("TUNEBOARD_DATA_ROOT", str(tmp_path / "data"))
    # The tests' datasets sit beside the data root (tmp_path/tiny): allowed here; the tests of
    # that limit (test_pages, test_datastore) take it away.
    monkeypatch.setenv("TUNEBOARD_EXTRA_DATA_ROOTS", str(tmp_path))
    monkeypatch.setenv("TUNEBOARD_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("TUNEBOARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.chdir(ROOT)
    return tmp_path


@functools.cache
def streamlit_startup_work_once() -> None:
    """What Streamlit's server does once when it starts, AppTest does for every page run: it scans
    the metadata of every installed package for Streamlit components (about 330 packages) and
    compiles the page anew (its AST rewritten for "magic"): together about a second of CPU per run
    of the Train page, more than the page itself. Neither changes while the tests run: the first
    scan's answer, and each page's compiled code (recompiled when the file changes), serve every
    AppTest of the process, as they serve every session of a server."""
    from streamlit.components.v2 import manifest_scanner
    from streamlit.runtime.scriptrunner.script_cache import ScriptCache
    from streamlit.testing.v1 import app_test, local_script_runner

    manifest_scanner.scan_component_manifests = functools.cache(manifest_scanner.scan_component_manifests)

    compiled: dict[tuple, object] = {}

    class SharedScriptCache(ScriptCache):
        def get_bytecode(self, script_path: str):
            path = os.path.abspath(script_path)
            stat = os.stat(path)
            key = (path, stat.st_mtime_ns, stat.st_size)
            if key not in compiled:
                compiled[key] = super().get_bytecode(path)
            return compiled[key]

    app_test.ScriptCache = local_script_runner.ScriptCache = SharedScriptCache


def page(name: str):
    from streamlit.testing.v1 import AppTest

    streamlit_startup_work_once()
    return AppTest.from_file(str(ROOT / name), default_timeout=PAGE_TIMEOUT)


def charts(at) -> list[dict]:
    """The plotly figures on a page (AppTest hands them back as JSON specs)."""
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def plotly_array(value):
    """Plotly's JSON keeps numeric arrays as lists or as base64 typed arrays: a numpy array either way."""
    import base64

    import numpy as np

    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if "shape" in value:
            arr = arr.reshape([int(n) for n in str(value["shape"]).split(",")])
        return arr
    return np.asarray(value)


# --- the dashboard in Chromium (the *_browser.py files) ------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    path = shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)
    if path:
        return path
    if os.environ.get("TUNEBOARD_REQUIRE_BROWSER"):
        pytest.fail("Chromium is required here (TUNEBOARD_REQUIRE_BROWSER is set) but /usr/bin/chromium is missing")
    pytest.skip("Debian's chromium is not installed (apt-get install chromium); the browser test needs it")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def dashboard_server(tmp_path_factory):
    """The dashboard started as the README starts it (`python serve.py`), once per worker process
    for every browser test file, on a free port: {"url", "data" (its data root, empty: each file
    writes its own dataset folder there), "runs" (its runs folder), "tmp"}. An empty torch hub and
    no GPU: the form's defaults must not depend on weights cached on this machine, and the tests
    watch runs grow and stop them mid-way, which a GPU would finish before the page could show it."""
    import subprocess
    import time
    import urllib.request

    from finetune_core import memory

    chromium_or_skip()
    tmp = tmp_path_factory.mktemp("dashboard")
    data = tmp / "data"
    data.mkdir()
    port = free_port()
    env = {**os.environ, "TUNEBOARD_DATA_ROOT": str(data), "TUNEBOARD_RUNS_DIR": str(tmp / "runs"),
           "TUNEBOARD_CACHE": str(tmp / "cache"), "TORCH_HOME": str(tmp / "torch_home"), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1"}
    log = open(tmp / "streamlit.log", "w")
    env = memory.untuned_environ(env)  # serve.py must add the settings itself
    proc = subprocess.Popen([sys.executable, "serve.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.terminate()
        pytest.fail(f"streamlit did not start: {(tmp / 'streamlit.log').read_text()[-2000:]}")
    yield {"url": url, "data": data, "tmp": tmp, "runs": tmp / "runs"}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="session")
def chromium_page(dashboard_server):
    """One Chromium page (Playwright) for every browser test of the worker process; each test
    starts with its own page.goto. New pages come from chromium_page.context.browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_or_skip(), args=CHROMIUM_FLAGS,
                                    ignore_default_args=["--headless=old"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (item.rep_call...), for fixtures that keep evidence of
    a failure (the browser test's last screenshot)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
