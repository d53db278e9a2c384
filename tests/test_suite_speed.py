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


def test_a_full_collection_walks_only_what_the_tests_made():
    """conftest freezes what the test process holds once the test modules are imported, and after
    each test what it left alive (gc.freeze): the engine's full gc.collect() at the end of every run
    then walks the objects of the test at hand, not the half million of torch, timm, Streamlit and
    pandas (0.25 s of CPU a run in a test worker; test_engine.py's fast tests 21 -> 13 s of CPU)."""
    import gc

    frozen = gc.get_freeze_count()
    assert frozen > 100_000, frozen
    assert len(gc.get_objects()) * 4 < frozen, (len(gc.get_objects()), frozen)  # what a collection walks
