"""Near copies: a perceptual-hash match counts only when the backbone's features agree (issue 21:
trashnet6's photos of different small objects on one plain background share a pHash)."""
from __future__ import annotations

import numpy as np

from finetune_core.review import near_copies


def test_a_hash_match_is_a_copy_only_when_the_features_agree_too():
    rng = np.random.default_rng(0)
    plain = rng.random((30, 64)) > 0.5
    plain[1], plain[3] = plain[0], plain[2]  # two pairs with the same pHash
    features = rng.normal(size=(30, 16))
    unit = features[2] / np.linalg.norm(features[2])
    other = rng.normal(size=16)
    other -= (other @ unit) * unit
    features[3] = unit + 0.45 * other / np.linalg.norm(other)  # cosine 0.91: the same photo, re-encoded
    assert 0.85 < features[3] @ features[2] / np.linalg.norm(features[3]) / np.linalg.norm(features[2]) < 0.95
    hashes = (plain, plain[:, ::-1], plain)
    assert {(i, j) for i, j, _ in near_copies(hashes, None)} == {(1, 0), (3, 2)}  # the hash alone
    # with features: image 1 looks like image 0 only to the hash (an unrelated vector)
    assert {(i, j) for i, j, _ in near_copies(hashes, features)} == {(3, 2)}


def test_the_pairs_cosine_quantile_takes_its_pairs_a_chunk_at_a_time():
    """The near-copy rule's dataset statistic drew 200,000 pairs' features at once (about 2 GB for
    a 1,280-feature backbone past 630 images, in the page's review job): the same quantile in chunks."""
    import tracemalloc

    import numpy as np

    from finetune_core.review import pair_cosine_quantile

    features = np.random.default_rng(0).standard_normal((700, 64)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    tracemalloc.start()
    try:
        quantile = pair_cosine_quantile(features, 0.999)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 30e6, f"{peak / 1e6:.0f} MB at its peak"  # 200,000 pairs at once: 102 MB
    i, j = np.triu_indices(700, 1)
    assert abs(quantile - np.quantile((features[i] * features[j]).sum(1), 0.999)) < 0.02  # a sample of all pairs
