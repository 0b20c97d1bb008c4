"""The stack shims of trime_fairseq.compat."""
import numpy as np

import trime_fairseq  # noqa: F401
from fairseq.data import data_utils


def test_batch_by_size_keeps_the_remainder_batch():
    # fairseq-fixed drops a final batch whose size is not a multiple of 8: data silently lost
    for n in (7, 10, 20):
        batches = data_utils.batch_by_size(
            np.arange(n), lambda i: 64, max_tokens=512, required_batch_size_multiple=8,
            num_tokens_vec=np.full(n, 64))
        assert np.concatenate(batches).tolist() == list(range(n))
        assert all(len(b) <= 8 for b in batches)


def test_numpy_compat_long_is_available():
    assert np.compat.long is not None
