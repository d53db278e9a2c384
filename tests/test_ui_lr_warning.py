"""The learning-rate warning's suggestion: it names the setting it is for, and it is on the
presets' and the finder's scale (issue 25, item 8: "about 0.00032" against the fast preset's 3e-3)."""
from __future__ import annotations

import re

from finetune_core.config import launch_warnings, preset_config


def suggested(warning: str, setting: str) -> float:
    return float(re.search(rf"or set {setting} to about ([0-9.e+-]+)", warning).group(1))


def test_the_fast_presets_warning_suggests_a_rate_on_the_presets_scale_for_the_setting_it_names():
    warnings = launch_warnings(preset_config("fast", data="x", lr=1.0))
    assert len(warnings) == 2  # the learning rate, and the head's rate (lr x 10)
    lr = suggested(warnings[0], "Learning rate")
    assert 3e-3 / 3 <= lr <= 3e-3 * 3  # the preset's 3e-3 (the finder found 0.0036), not 0.00032
    # the head is off only through the learning rate: it says the multiplier (10) is fine, and which rate to set
    # (a first user was told to set the multiplier to about 10, the value it had)
    assert "the multiplier (10) is fine: change the learning rate (about" in warnings[1]
    assert "or set Head learning-rate multiplier" not in warnings[1]
    assert launch_warnings(preset_config("fast", data="x", lr=lr)) == []  # taking the suggestion: no warning


def test_a_head_only_suggestion_names_the_multiplier_at_the_learning_rate_typed():
    warnings = launch_warnings(preset_config("fast", data="x", lr=3e-3, head_lr_mult=3000))
    assert len(warnings) == 1 and warnings[0].startswith("Head learning rate (lr × multiplier) 9 is far above")
    mult = suggested(warnings[0], "Head learning-rate multiplier")
    assert "at learning rate 0.003" in warnings[0] and 3 <= mult <= 30  # the presets use 10
    assert launch_warnings(preset_config("fast", data="x", lr=3e-3, head_lr_mult=mult)) == []
