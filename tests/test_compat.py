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


def test_clip_grad_norm_keeps_cpu_gradients_on_the_cpu_when_cuda_is_available(monkeypatch):
    # fairseq summed the norms on torch.cuda.current_device() whenever CUDA existed, so
    # ``--cpu --clip-norm`` failed on GPU machines; here CUDA "exists" but must not be touched
    import torch
    from fairseq import utils

    def no_cuda_device():
        raise AssertionError("a --cpu run touched the CUDA device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", no_cuda_device)
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([[0.0, 4.0], [0.0, 0.0]])
    norm = utils.clip_grad_norm_(params, max_norm=1.0)
    assert norm.device.type == "cpu" and abs(float(norm) - 5.0) < 1e-5
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(params[1].grad, torch.tensor([[0.0, 0.8], [0.0, 0.0]]), atol=1e-5)
