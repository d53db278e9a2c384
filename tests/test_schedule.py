"""The fast preset's automatic schedule (epochs and cached views by the set's size) and the
k-fold benchmark's stratified subsets it was chosen with (issue 22, item 4)."""
from benchmarks.kfold_fast import stratified_subset


def test_a_fraction_of_the_training_split_keeps_each_class_share_and_is_the_same_each_time():
    labels = [0] * 40 + [1] * 20 + [2] * 4
    kept = stratified_subset(labels, 0.25, seed=0)
    assert [sum(labels[i] == c for i in kept) for c in (0, 1, 2)] == [10, 5, 1]
    assert kept == sorted(kept) and kept == stratified_subset(labels, 0.25, seed=0)
    assert kept != stratified_subset(labels, 0.25, seed=1)
    assert stratified_subset(labels, 1.0, seed=0) == list(range(len(labels)))


def test_the_automatic_schedule_keeps_30_epochs_and_4_views_to_trashnet6s_size_and_floors_beyond():
    from finetune_core.engine import auto_schedule

    # 300 and 2,000 (trashnet6's 2,024 training images): the small sets' schedule. The old budgets
    # (15,000 images seen, 4,000 frozen passes) gave 8 epochs and 2 views at 2,000, scored below a
    # linear probe; larger sets now keep 15 epochs and 2 views instead of falling to 6.
    assert [auto_schedule(n) for n in (300, 2_000, 8_000, 50_000)] == [(30, 4), (30, 4), (15, 2), (15, 2)]
    assert auto_schedule(3_000) == (25, 3)  # between: the images seen and the frozen passes held
