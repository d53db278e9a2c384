"""The dashboard's server does not garbage-collect after every script run (issue 25, item 1).

Streamlit's runner.postScriptGC (on by default) runs a full gc.collect() after each rerun; every
open page reruns its live part every 1-2 s, and a collection in a process holding PyTorch blocked
the training thread for 0.25-0.6 s each time: a run took 4-19x longer with tabs open.
benchmarks/bench_tabs.py measures a run with real Chromium tabs; these tests keep the setting.
"""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

# Streamlit's own `streamlit run` command line, stopped where it would start the server: what it
# then holds for runner.postScriptGC is what the server would use. One interpreter answers every
# case (each importing Streamlit took a second or more): Streamlit parses its options again, from
# the config.toml of the folder it is started in, on every `streamlit run`.
STREAMLIT_RUN = """
import json, os, sys
from click.testing import CliRunner
from streamlit import config
from streamlit.web import bootstrap, cli
bootstrap.run = lambda *a, **k: print("postScriptGC", config.get_option("runner.postScriptGC"))
for cwd, args in json.loads(sys.argv[1]):
    os.chdir(cwd)
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    print(result.output)
"""


def post_script_gc(cases: list[tuple[list[str], str]]) -> list[str]:
    """runner.postScriptGC for each (streamlit arguments, folder it is started in)."""
    out = subprocess.run([sys.executable, "-c", STREAMLIT_RUN, json.dumps([[str(cwd), args] for args, cwd in cases])],
                         capture_output=True, text=True, check=True).stdout
    return [part.split()[0] for part in out.split("postScriptGC")[1:]]


def test_config_toml_turns_it_off_and_serve_py_turns_it_off_from_anywhere(tmp_path):
    """`streamlit run app.py` in the repository reads .streamlit/config.toml. serve.py passes the
    option itself, so it holds wherever the server starts from and whatever config.toml says (here:
    an app outside the repository, no config.toml); the user's own --runner.postScriptGC wins."""
    import serve

    (tmp_path / "app.py").write_text("")
    args = serve.streamlit_args(["--server.port", "8600"])
    elsewhere = [args[0], str(tmp_path / "app.py"), *args[2:]]
    user = serve.streamlit_args(["--runner.postScriptGC", "true"])
    assert post_script_gc([(["run", str(ROOT / "app.py")], ROOT),
                           (["run", str(tmp_path / "app.py")], tmp_path),  # Streamlit's default
                           (elsewhere, tmp_path),
                           ([user[0], str(tmp_path / "app.py"), *user[2:]], tmp_path)]) == ["False", "True", "False", "True"]
