"""Character-level text data: vocabulary, encode/decode, split, (x, y) windows."""
import numpy as np
import pytest

from disttrain.data import CharDataset, DataLoader, Vocab, char_datasets, load_text, split_ids
from disttrain.data.text import DEFAULT_TEXT


def test_vocab_is_sorted_distinct_characters_and_round_trips():
    vocab = Vocab("hello, world")
    assert vocab.chars == " ,dehlorw" and len(vocab) == 9
    ids = vocab.encode("hello")
    assert ids.dtype == np.int64 and ids.tolist() == [4, 3, 5, 5, 6]
    assert vocab.decode(ids) == "hello"


def test_vocab_handles_non_ascii_and_rejects_unknown_characters():
    vocab = Vocab("añb€")
    assert vocab.decode(vocab.encode("€ñab")) == "€ñab"
    with pytest.raises(KeyError, match="'z'"):
        vocab.encode("abz")


def test_windows_are_targets_shifted_by_one():
    dataset = CharDataset(np.arange(11), seq_len=3)
    assert len(dataset) == 3  # 10 usable (x, y) positions -> 3 whole windows
    x, y = dataset[1]
    assert x.tolist() == [3, 4, 5] and y.tolist() == [4, 5, 6]
    xb, yb = dataset.get_batch(np.array([2, 0]))
    assert xb.tolist() == [[6, 7, 8], [0, 1, 2]] and yb.tolist() == [[7, 8, 9], [1, 2, 3]]


def test_char_dataset_batches_through_the_data_loader():
    dataset = CharDataset(np.arange(101), seq_len=10)
    batches = list(DataLoader(dataset, 4, shuffle=True, seed=0))
    assert [b[0].shape for b in batches] == [(4, 10), (4, 10), (2, 10)]
    starts = sorted(int(b) for x, _ in batches for b in x[:, 0])
    assert starts == list(range(0, 100, 10))


def test_split_keeps_first_ninety_percent_for_training():
    train, val = split_ids(np.arange(100))
    assert train.tolist() == list(range(90)) and val.tolist() == list(range(90, 100))


@pytest.mark.skipif(not DEFAULT_TEXT.exists(), reason="repository tiny-shakespeare not present")
def test_tiny_shakespeare_has_65_characters_and_a_90_10_split():
    text = load_text()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    vocab, train, val = char_datasets(text, seq_len=100)
    assert len(vocab) == 65
    assert len(train) == (int(0.9 * len(text)) - 1) // 100
    x, y = train[0]
    assert vocab.decode(x).startswith("First Citizen:") and vocab.decode(y)[:-1] == vocab.decode(x)[1:]


def test_too_short_text_is_rejected_naming_sizes():
    with pytest.raises(ValueError, match="seq_len=5 and 5 ids"):
        CharDataset(np.arange(5), seq_len=5)
