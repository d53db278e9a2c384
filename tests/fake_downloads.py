"""Fake weight downloads for tests/test_weights_download.py. They run in the child process that
downloads.WeightsDownloads starts (`python -m finetune_core.downloads fake_downloads:NAME ...`, with
tests/ on PYTHONPATH), which imports this module by name: stdlib only, so that the child starts in a
moment."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

NAME = "mobilenetv3_small_050.lamb_in1k"  # a timm model: its weights live on the hub as timm/NAME
CHUNK, CHUNKS = 4096, 6


def hub_cache() -> Path:
    """$HF_HOME/hub: the tests set HF_HOME and unset the variables that would win over it."""
    return Path(os.environ["HF_HOME"]) / "hub"


def _fake_hub_download(backbone: str, report, pause: float) -> Path:
    """What huggingface_hub does, without a network: the bytes go to blobs/SHA.incomplete, the blob
    is renamed and linked into snapshots/REVISION/ once whole, refs/main names the revision."""
    repo = hub_cache() / f"models--timm--{backbone}"
    data = bytes(range(256)) * (CHUNK * CHUNKS // 256)
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(blob.name + ".incomplete")
    with open(partial, "wb") as out:
        for i in range(CHUNKS):
            out.write(data[i * CHUNK:(i + 1) * CHUNK])
            out.flush()
            report((i + 1) * CHUNK, len(data))
            time.sleep(pause)
    os.replace(partial, blob)
    snapshot = repo / "snapshots" / ("0" * 40) / "model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def slow_fake_download(backbone: str, report) -> Path:
    """Six chunks, FAKE_DOWNLOAD_PAUSE seconds apart."""
    return _fake_hub_download(backbone, report, pause=float(os.environ.get("FAKE_DOWNLOAD_PAUSE", "0.3")))


def unreachable_download(backbone: str, report) -> Path:
    raise ConnectionError("[Errno 101] Network is unreachable")


def garbled_download(backbone: str, report) -> Path:
    """A child that prints bytes that are not text, and a line that looks like progress but is not,
    before a download that completes."""
    import sys

    sys.stdout.buffer.write(b"\xff\xfe not text\n")
    sys.stdout.write("tuneboard-download {not json\n")
    sys.stdout.flush()
    return _fake_hub_download(backbone, report, pause=0)


def offline_download(backbone: str, report) -> Path:
    """What urllib says on a machine without a network: an error whose text is in angle brackets."""
    raise OSError("<urlopen error [Errno -2] Name or service not known>")
