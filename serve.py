"""Start the dashboard: `python serve.py [streamlit options]`, e.g. `python serve.py --server.port 8600`.

The same as `streamlit run app.py`, but Python starts with glibc's malloc settings from
finetune_core.memory, which glibc reads only at start: CPU training runs up to 2x faster. Settings
in .streamlit/config.toml apply as usual (the server binds to 127.0.0.1).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from finetune_core import memory  # noqa: E402  (stdlib only: nothing heavy before the exec)


def command(streamlit_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start the dashboard."""
    env = memory.tuned_environ() if memory.wanted() else dict(os.environ)
    return [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), *streamlit_args], env


PATH_VARIABLES = ("TUNEBOARD_DATA_ROOT", "TUNEBOARD_RUNS_DIR", "TUNEBOARD_CACHE")


def main(argv: list[str] | None = None) -> None:
    cmd, env = command(sys.argv[1:] if argv is None else argv)
    for name in PATH_VARIABLES:  # relative to where the user typed the command, not to ROOT
        if env.get(name):
            env[name] = str(Path(env[name]).expanduser().resolve())
    os.chdir(ROOT)  # Streamlit reads .streamlit/config.toml (127.0.0.1 only) from the working folder
    sys.stdout.flush()
    os.execve(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
