"""TokenWindowDataset: windows over memory-mapped shards, and batches for training."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from reformer_dist.data import GlobalOrderSampler, TokenWindowDataset, next_batch, prepare_corpus
from reformer_dist.errors import DataError

N_BYTES = 5000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data_dir, the bytes it holds): random bytes, small shards so windows straddle shard ends."""
    root = tmp_path_factory.mktemp("corpus")
    data = np.random.default_rng(1).integers(0, 256, N_BYTES, dtype=np.uint8).tobytes()
    (root / "a.bin").write_bytes(data)
    prepare_corpus([str(root / "a.bin")], str(root / "data"), byte_offset=3, shard_tokens=777, val_fraction=0.0)
    return str(root / "data"), np.frombuffer(data, dtype=np.uint8).astype(np.int64) + 3


def test_windows_are_consecutive_stretches_of_the_stream_sharing_one_token(corpus):
    data_dir, stream = corpus
    ds = TokenWindowDataset(data_dir, "train", seq_len=64)
    assert len(ds) == (N_BYTES - 1) // 64 and ds.n_tokens == N_BYTES
    assert ds.vocab_size == 259 and ds.tokenizer_spec == {"kind": "bytes", "offset": 3}
    for i in range(len(ds)):  # several windows cross one of the 777-token shard boundaries
        w = ds[i]
        assert w.dtype == np.int64 and w.shape == (65,)
        np.testing.assert_array_equal(w, stream[i * 64:i * 64 + 65])
    np.testing.assert_array_equal(ds[-1], ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_seq_len_longer_than_the_split_is_a_data_error(corpus):
    data_dir, _ = corpus
    assert len(TokenWindowDataset(data_dir, "train", seq_len=N_BYTES - 1)) == 1
    with pytest.raises(DataError, match=r"5,000 tokens, fewer than the seq_len \+ 1 = 5,001"):
        TokenWindowDataset(data_dir, "train", seq_len=N_BYTES)
    with pytest.raises(DataError, match="'val' has 0 tokens"):
        TokenWindowDataset(data_dir, "val", seq_len=8)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenWindowDataset(data_dir, "test", seq_len=8)


def test_pickling_sends_paths_not_token_data(corpus):
    data_dir, _ = corpus
    ds = TokenWindowDataset(data_dir, "train", seq_len=1024)
    ds[0]  # opens the memmaps
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # the 5000 tokens are not in it
    np.testing.assert_array_equal(pickle.loads(blob)[3], ds[3])


def test_next_batch_gives_shifted_inputs_and_targets_for_this_ranks_indices(corpus):
    data_dir, _ = corpus
    ds = TokenWindowDataset(data_dir, "train", seq_len=32)
    sampler = GlobalOrderSampler(len(ds), seed=7, rank=1, world_size=2)
    expected = GlobalOrderSampler(len(ds), seed=7, rank=1, world_size=2).next_indices(4)
    input_ids, targets = next_batch(ds, sampler, micro_batch_size=4)
    assert input_ids.shape == targets.shape == (4, 32)
    assert str(input_ids.dtype) == "torch.int64"
    windows = np.stack([ds[int(i)] for i in expected])
    np.testing.assert_array_equal(input_ids.numpy(), windows[:, :-1])
    np.testing.assert_array_equal(targets.numpy(), windows[:, 1:])
    assert sampler.consumed_global_samples == 8
