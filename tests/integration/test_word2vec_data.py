"""word2vec's data pipeline (workers/word2vec.py): skip-gram pairs stay inside the window,
subsampling keeps rare words and thins frequent ones, negatives follow unigram^0.75."""
import sys

import numpy as np

from tests.integration.test_workers import ROOT

sys.path.insert(0, str(ROOT / "workers"))
import word2vec  # noqa: E402


def test_every_pair_is_within_the_window_and_each_near_pair_appears():
    ids = np.arange(1000)            # distinct ids: a pair's ids give its positions
    pairs = word2vec.skipgram_pairs(ids, 3, np.random.default_rng(0))
    distance = np.abs(pairs[:, 0] - pairs[:, 1])
    assert distance.min() == 1 and distance.max() == 3
    # Every centre sees both neighbours at distance 1 (reach is at least 1).
    assert len(np.unique(pairs[distance == 1], axis=0)) == 2 * 999
    # Dynamic window: distance 3 only for centres that drew reach 3, about a third.
    assert 0.2 < (distance == 3).sum() / (2 * 997) < 0.45


def test_subsampling_keeps_rare_words_and_thins_frequent_ones():
    counts = np.array([100000, 1000, 10, 1])
    keep = word2vec.keep_probabilities(counts, 1e-3)
    assert keep[-1] == keep[-2] == 1.0
    assert keep[0] < keep[1] < 1.0


def test_negatives_follow_the_unigram_distribution_to_the_three_quarters():
    counts = np.array([1000, 100, 10, 1])
    cdf = word2vec.noise_cdf(counts)
    drawn = word2vec.negatives(cdf, (200000,), np.random.default_rng(0))
    expected = counts ** 0.75 / (counts ** 0.75).sum()
    np.testing.assert_allclose(np.bincount(drawn, minlength=4) / len(drawn), expected, atol=3e-3)


def test_rare_words_are_dropped_and_ids_follow_frequency():
    words = word2vec.Words("the cat and the dog and the end. The END", min_count=2)
    assert words.words == ["the", "and", "end"]
    assert words.ids.tolist() == [0, 1, 0, 1, 0, 2, 0, 2]
