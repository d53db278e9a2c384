"""What a process pays before it trains: the imports a run makes only to describe itself."""
from __future__ import annotations

import sys
from importlib import metadata

from finetune_core import engine


def test_a_run_records_timms_version_without_importing_timm(monkeypatch):
    """A ResNet-18 run (torchvision) never uses timm: recording timm's version must not import it
    (about a second of every command-line run, torchrun rank and first dashboard run). With timm made
    unimportable the version is still recorded, from the installed package's metadata."""
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError from here on
    versions = engine.library_versions()
    assert versions["timm"] == metadata.version("timm")
    assert versions["torch"] and versions["torchvision"] and versions["tuneboard"]
