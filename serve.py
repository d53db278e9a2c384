"""Start the dashboard: `python serve.py [streamlit options]`, e.g. `python serve.py --server.port 8600`.

The same as `streamlit run app.py`, started the same way on Linux, macOS and Windows (in this
process: nothing is re-executed), with:
- glibc's malloc settings from finetune_core.memory, set with mallopt before any thread starts
  (Linux with glibc; nothing to do elsewhere): CPU training runs up to 2x faster. No environment
  variable carries them into child processes.
- the address to listen on: TUNEBOARD_ADDRESS if set (e.g. 0.0.0.0 for every interface; mind
  that the dashboard has no login), else 127.0.0.1, this machine only. --server.address wins.
- no garbage collection after every script run (Streamlit's runner.postScriptGC, on by default):
  each open page reruns its live part every 1-2 s, and a full gc.collect() in a process holding
  PyTorch takes 0.25-0.6 s under the GIL, which slowed the training thread several-fold with a
  tab open. .streamlit/config.toml says the same for `streamlit run app.py`; this flag applies it
  wherever serve.py is started from. --runner.postScriptGC wins.
- runs that end with the server: on Ctrl-C or SIGTERM, Streamlit stops and the interpreter exits,
  and jobs.JobManager.shutdown (registered at exit) stops a run in progress at its next batch.
- a sidebar that lists Home, Train, Review, Compare and Predict from the first load
  (list_only_app_pys_pages), not the pages/ folder's file names.
Other settings come from .streamlit/config.toml as usual.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from finetune_core import memory  # noqa: E402  (stdlib only: no thread may start before mallopt)

ADDRESS_VARIABLE, DEFAULT_ADDRESS = "TUNEBOARD_ADDRESS", "127.0.0.1"
PATH_VARIABLES = ("TUNEBOARD_DATA_ROOT", "TUNEBOARD_RUNS_DIR", "TUNEBOARD_CACHE")
# Settings serve.py passes unless the user's options name them (see the docstring for why).
DEFAULT_OPTIONS = {"--runner.postScriptGC": "false"}


def streamlit_args(argv: list[str], environ=None) -> list[str]:
    """The `streamlit` command's arguments: run app.py at the address with DEFAULT_OPTIONS, then the
    user's options (an option the user gives is not passed twice)."""
    env = os.environ if environ is None else environ
    args = ["run", str(ROOT / "app.py")]
    defaults = {"--server.address": env.get(ADDRESS_VARIABLE, "").strip() or DEFAULT_ADDRESS, **DEFAULT_OPTIONS}
    for option, value in defaults.items():
        if not any(a == option or a.startswith(option + "=") for a in argv):
            args += [option, value]
    return args + list(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    memory.tune_in_process()  # first: glibc's arenas are per thread, and threads start below
    for name in PATH_VARIABLES:  # relative to where the user typed the command, not to ROOT
        if os.environ.get(name):
            os.environ[name] = str(Path(os.environ[name]).expanduser().resolve())
    os.chdir(ROOT)  # Streamlit reads .streamlit/config.toml from the working folder
    from streamlit.web import cli

    list_only_app_pys_pages()
    cli.main(args=streamlit_args(argv), prog_name="streamlit")


def list_only_app_pys_pages() -> None:
    """The sidebar lists app.py's st.navigation (Home, Train, Review, Compare, Predict, with icons)
    from the first load. Streamlit decides once per process, from the existence of a pages/ folder
    beside app.py (PagesManager.uses_pages_directory), to run the first session through its old
    pages/ listing ("app", Train, Compare, Review, Predict: file names, no icons), which that
    session kept. Deciding "no" before the server starts leaves app.py's navigation alone; the
    pages stay in pages/, where links straight to a page (/Train, /Review?...) work (moving them
    to views/ broke those). A Streamlit without that attribute is left as it is."""
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:
        return
    if hasattr(PagesManager, "uses_pages_directory"):
        PagesManager.uses_pages_directory = False


if __name__ == "__main__":
    main()
