"""What a run is doing now, and how fast: its phase (preparing, decoding, caching activations,
training, evaluating) and the rate and time left of that phase alone, from the run's events.

A run's overall figures mixed its phases: images/s averaged over the caching phase read 1.1 while
training ran at over 100 images/s, and the time left jumped from 40 s to 2 min 47 s as a phase
ended. Here each phase is measured from its own first event: a rate is the phase's work done since
then over the time since then, and its time left is the phase's work left at that rate.
"""
from __future__ import annotations

import re

PREPARING, DECODING, CACHING, TRAINING, EVALUATING = (
    "preparing", "decoding", "caching activations", "training", "evaluating")
# The engine's setup messages (engine.py: reporter.prepare) that start a phase, and the "(done/total"
# count in them.
_PREFIXES = {"decoding images": DECODING, "computing the frozen layers' output": CACHING, "evaluating": EVALUATING}
_COUNT = re.compile(r"\((\d+)/(\d+)")


def phase_of(event: dict) -> str:
    if event.get("kind") == "batch":
        return TRAINING
    message = str(event.get("message", ""))
    return next((phase for prefix, phase in _PREFIXES.items() if message.startswith(prefix)), PREPARING)


class PhaseMeter:
    """Fed a run's events in order (update), says its phase and that phase's rates (current).
    `batch_size`: the images a training step takes (for training's images/s)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.phase = PREPARING
        self._start: tuple[float, float] | None = None  # (elapsed_s, work done) at the phase's first event
        self.current: dict = {"phase": PREPARING, "images_per_s": None, "eta_s": None}

    def update(self, event: dict) -> dict:
        phase, now = phase_of(event), event.get("elapsed_s")
        done, total = self._work(phase, event)
        if phase != self.phase or self._start is None:
            self.phase, self._start = phase, (now, done) if now is not None and done is not None else None
        rate = eta = None
        if self._start is not None and now is not None and done is not None and now > self._start[0] \
                and done > self._start[1]:
            per_s = (done - self._start[1]) / (now - self._start[0])  # work units a second, in this phase
            eta = round((total - done) / per_s, 1)
            rate = per_s * (self.batch_size if phase == TRAINING else 1)
        self.current = {"phase": phase, "images_per_s": None if rate is None else round(rate, 1), "eta_s": eta}
        return self.current

    def _work(self, phase: str, event: dict) -> tuple[float | None, float | None]:
        """(done, total) of the phase's work: images for decoding and caching, the run's steps for training."""
        if phase == TRAINING:
            step, progress = event.get("step"), event.get("progress")
            if not step or not progress:
                return None, None
            return float(step), step / progress  # progress is step / the run's total steps
        found = _COUNT.search(str(event.get("message", "")))
        return (float(found.group(1)), float(found.group(2))) if found else (None, None)
