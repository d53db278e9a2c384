"""What a run is doing now, and how fast: its phase (preparing, decoding, caching activations,
training, evaluating) and the rate and time left of that phase alone, from the run's events.

A run's overall figures mixed its phases: images/s averaged over the caching phase read 1.1 while
training ran at over 100 images/s, and the time left jumped from 40 s to 2 min 47 s as a phase
ended. Here each phase is measured from its own first event: a rate is the phase's work done since
then over the time since then, and its time left is the phase's work left at that rate. A phase
made of passes (caching: one pass per training view, then validation and test) starts again with
each pass: when its count goes down or the pass's subject (the message before the count) changes.
An epoch's row and the learning-rate finder's steps are training: they keep its rate going.
"""
from __future__ import annotations

import re

PREPARING, DECODING, CACHING, TRAINING, EVALUATING = (
    "preparing", "decoding", "caching activations", "training", "evaluating")
# The engine's setup messages (engine.py: reporter.prepare) that start a phase, and the "(done/total"
# count in them.
_PREFIXES = {"decoding images": DECODING, "decoding the test images": DECODING, "computing the frozen layers' output": CACHING, "evaluating": EVALUATING}
_COUNT = re.compile(r"\((\d+)/(\d+)")
_TRAINING_KINDS = {"batch", "epoch", "lr_find"}  # a training step, an epoch's row, a finder's step


def phase_of(event: dict) -> str:
    if event.get("kind") in _TRAINING_KINDS:
        return TRAINING
    message = str(event.get("message", ""))
    return next((phase for prefix, phase in _PREFIXES.items() if message.startswith(prefix)), PREPARING)


class PhaseMeter:
    """Fed a run's events in order (update), says its phase and that phase's rates (current).
    `batch_size`: the images a training step takes (for training's images/s)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.phase = PREPARING
        self._start: tuple[float, float] | None = None  # (elapsed_s, work done) at the pass's first event
        self._pass: tuple[str, str] | None = None  # (phase, subject) of the pass measured
        self._done: float | None = None  # the work done at the last event
        self.current: dict = {"phase": PREPARING, "images_per_s": None, "eta_s": None}

    def update(self, event: dict) -> dict:
        phase, now = phase_of(event), event.get("elapsed_s")
        done, total = self._work(phase, event)
        this_pass = (phase, self._subject(phase, event))
        went_down = done is not None and self._done is not None and done < self._done
        if this_pass != self._pass or went_down or self._start is None:
            self.phase, self._pass = phase, this_pass
            self._start = (now, done) if now is not None and done is not None else None
        self._done = done
        rate = eta = None
        if self._start is not None and now is not None and done is not None and now > self._start[0] \
                and done > self._start[1]:
            per_s = (done - self._start[1]) / (now - self._start[0])  # work units a second, in this phase
            eta = round((total - done) / per_s, 1)
            rate = per_s * (self.batch_size if phase == TRAINING else 1)
        self.current = {"phase": phase, "images_per_s": None if rate is None else round(rate, 1), "eta_s": eta}
        return self.current

    @staticmethod
    def _subject(phase: str, event: dict) -> str:
        """What a pass works on: the message before its count ("... for training view 1"); training
        is one pass (its messages change with each batch)."""
        if phase == TRAINING:
            return ""
        message = str(event.get("message", ""))
        found = _COUNT.search(message)
        return message[:found.start()].strip() if found else message

    def _work(self, phase: str, event: dict) -> tuple[float | None, float | None]:
        """(done, total) of the phase's work: images for decoding and caching, the run's steps for training."""
        if phase == TRAINING:
            step, progress = event.get("step"), event.get("progress")
            if not step or not progress:
                return None, None
            return float(step), step / progress  # progress is step / the run's total steps
        found = _COUNT.search(str(event.get("message", "")))
        return (float(found.group(1)), float(found.group(2))) if found else (None, None)
