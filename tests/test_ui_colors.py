"""One colour per run, from its id alone, the same on every page; no two alike (issue 25, item 6)."""
from __future__ import annotations

import itertools

from finetune_core import plots
from test_compare_predict import logged_metrics

# The runs: a base, its scratch twin and its no-groups twin, with two more beside them.
BASE = "20261129-101500-fine"
TWINS = ["20261129-101500-fine-scratch", "20261129-101501-fine-one-group"]
OTHERS = ["20261130-090000-sweep-0", "20261130-090001-sweep-1"]


def test_a_runs_colour_does_not_depend_on_what_else_is_on_the_chart():
    """The scratch twin was purple beside its base and blue once the no-groups twin joined."""
    alone = plots.run_colors([TWINS[0]])[TWINS[0]]
    # an older run that hashes to the same colour (the old rule then moved the newer one on)
    same = next(i for i in (f"20261128-0000{k:02d}-x" for k in range(100)) if plots.run_color(i) == alone)
    for company in itertools.chain.from_iterable(itertools.combinations([BASE, TWINS[1], *OTHERS, same], n)
                                                 for n in range(1, 6)):
        assert plots.run_colors([TWINS[0], *company])[TWINS[0]] == alone


def test_runs_whose_ids_share_a_colour_are_drawn_apart_in_id_order():
    colliding = next((a, b) for a, b in itertools.combinations([f"20261201-1200{k:02d}-run" for k in range(40)], 2)
                     if plots.run_color(a) == plots.run_color(b))
    for order in (colliding, colliding[::-1]):
        assert plots.run_dashes(order) == {colliding[0]: "solid", colliding[1]: "dash"}
    styles = plots.run_styles({colliding[0]: "older", colliding[1]: "newer"})
    fig = plots.overlay_figure({"older": logged_metrics([{"kind": "batch", "epoch": 0.5, "step": 1, "loss": 1.0}]),
                                "newer": logged_metrics([{"kind": "batch", "epoch": 0.5, "step": 1, "loss": 0.9}])},
                               metrics=("loss",), **styles)
    assert {(t.name, t.line.color, t.line.dash) for t in fig.data} == {
        ("older", plots.run_color(colliding[0]), "solid"), ("newer", plots.run_color(colliding[0]), "dash")}


def test_no_two_palette_colours_look_alike():
    """The earlier palette's violet and grape (the issue's 'near-identical purples') were 26 apart."""
    assert plots.color_difference("#7048e8", "#ae3ec9") < plots.MIN_COLOR_DIFFERENCE
    assert round(plots.color_difference("#ffffff", "#000000")) == 100  # CIELAB's lightness range
    assert min(plots.color_difference(a, b)
               for a, b in itertools.combinations(plots.PALETTE, 2)) >= plots.MIN_COLOR_DIFFERENCE
