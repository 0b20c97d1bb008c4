"""examples/copy_probe.py: the in-context and through-memory copy measurements."""
import math

import torch
import torch.nn.functional as F

from examples.copy_probe import in_context, random_sequences, through_memory, with_local_memory
from helpers import make_dictionary, make_model
from test_memorizing import make_memorizing


class OracleCopier:
    """Predicts the token that followed the last earlier occurrence of the current token
    (logit 50), uniform where the token has not occurred yet."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, tokens, **_):
        b, t = tokens.shape
        logits = torch.zeros(b, t, self.vocab)
        for r in range(b):
            seen = {}
            for i in range(t):
                tok = int(tokens[r, i])
                if tok in seen:
                    logits[r, i, int(tokens[r, seen[tok] + 1])] = 50.0
                if i + 1 < t:
                    seen[tok] = i
        return logits, {}

    def get_normalized_probs(self, out, log_probs, sample=None):  # fairseq's signature
        return F.log_softmax(out[0], dim=-1) if log_probs else F.softmax(out[0], dim=-1)


def test_in_context_copy_gain_of_a_copier_and_of_a_model_that_cannot_copy():
    vocab = 5000
    seqs = random_sequences(vocab, 4, 20, 8, seed=0)
    assert seqs.min() >= 4 and seqs.max() < vocab
    oracle = in_context(OracleCopier(vocab), seqs, eos=2)
    # first copy: (nearly) uniform; second copy: the copy rule is right at every scored position
    assert abs(oracle["first_copy_nll"] - math.log(vocab)) < 0.05
    assert oracle["second_copy_nll"] < 1e-3

    class Uniform(OracleCopier):
        def __call__(self, tokens, **_):
            return torch.zeros(*tokens.shape, self.vocab), {}

    flat = in_context(Uniform(vocab), seqs, eos=2)
    assert flat["in_context_gain_nats"] == 0.0


def test_through_memory_reads_the_memorizing_layer_and_only_it():
    d = make_dictionary(40)
    seqs = random_sequences(len(d), d.nspecial, 12, 3, seed=1)
    assert through_memory(make_memorizing(d, memory_size=0), seqs, d.eos()) is None  # no memory
    model = make_memorizing(d, memory_size=64, topk=4)
    with torch.no_grad():
        used = through_memory(model, seqs, d.eos())
        model.knn_attention.mem_gate.fill_(-1e4)  # σ(b) = 0: the memory result is ignored
        ignored = through_memory(model, seqs, d.eos())
    assert used["memory_nll"] != used["no_memory_nll"]
    assert ignored["memory_gain_nats"] == 0.0
    assert model.knn_attention.memory.keys is None  # left empty for whatever runs next



def test_eq6_local_memory_copies_where_the_model_alone_cannot():
    """With its layers silenced, a model cannot copy, and its g is its current token (plus
    position): Eq. 6 over local memory then lends each token of the second copy the token
    that followed the same token in the first, while the first copy (no earlier equal token)
    gains nothing."""
    d = make_dictionary(200)
    model = make_model(d, seed=0)
    with torch.no_grad():
        for layer in model.decoder.layers:
            for lin in (layer.self_attn.out_proj, layer.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    g = torch.Generator().manual_seed(3)  # distinct tokens inside each sequence
    seqs = torch.stack([torch.randperm(len(d) - d.nspecial, generator=g)[:16] + d.nspecial for _ in range(4)])
    with torch.no_grad():
        alone = in_context(model, seqs, d.eos())
        mem = with_local_memory(model, seqs, d.eos(), d.pad(), tau=1.0)
    assert abs(alone["in_context_gain_nats"]) < 0.5
    assert abs(mem["memory_first_copy_nll"] - alone["first_copy_nll"]) < 0.5
    assert mem["memory_second_copy_nll"] < alone["second_copy_nll"] - 3
