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
