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


def test_numpy_compat_shim_provides_long_when_numpy_lacks_it(monkeypatch):
    from trime_fairseq import compat

    # numpy >= 2 has no np.compat: the shim must add exactly the name fairseq uses
    monkeypatch.delattr(np, "compat", raising=False)
    compat._patch_numpy_compat()
    assert np.compat.long is np.int64
    # an np.compat without ``long`` gets it too
    monkeypatch.setattr(np, "compat", type("C", (), {})())
    compat._patch_numpy_compat()
    assert np.compat.long is np.int64
