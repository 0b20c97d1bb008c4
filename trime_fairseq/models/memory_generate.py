"""External memory at decoding time inside ``fairseq-generate`` (kNN-MT, adaptive kNN-MT, TRIME-MT).

fairseq's ``SequenceGenerator`` runs ``model.decoder`` one step at a time (incremental
state, beams and batches as usual) and then calls ``model.get_normalized_probs``. The
``trime_translation`` task wraps the loaded model in :class:`MemoryGenerationModel`: the
decoder is the inner one, and ``get_normalized_probs`` takes the step's query ``g`` (the
input of the last decoder layer's feed-forward block, read by a hook), retrieves ``K``
neighbours for all ``batch x beam`` hypotheses in one FAISS search, and returns the
distribution of the task's :class:`~trime_fairseq.memory.combiners.Combiner`.
The same path serves ``--score-reference`` (all positions at once).
"""
import time
from typing import Optional

from fairseq.models import BaseFairseqModel
from torch import Tensor

from trime_fairseq.memory.combiners import Combiner, ScoringInputs
from trime_fairseq.memory.retriever import Retriever
from trime_fairseq.models.wrapper import MemoryModelWrapper
from trime_fairseq.models.output_layer import at_least_float32
from trime_fairseq.errors import TrimeUserError


class MemoryGenerationModel(MemoryModelWrapper):
    """Wraps a trained fairseq encoder-decoder; decodes with a datastore and a combiner.

    Parameters, checkpoints and the encoder/decoder are the inner model's. ``timings``
    accumulates seconds spent in retrieval and in combining (for benchmarks; the generator
    drives the decoder directly, so ``model`` stays 0 here). With the retriever's skip rule
    (``--retrieval-skip-feature``), hypotheses where the model is confident are not
    searched and get the model's own distribution (the same :meth:`Retriever.search` as
    ``fairseq-eval-lm``).
    """

    def __init__(self, model: BaseFairseqModel, combiner: Combiner, retriever: Retriever) -> None:
        super().__init__(model, combiner)
        self.retriever = retriever

    def forward(self, src_tokens: Tensor, src_lengths: Tensor, prev_output_tokens: Tensor, **kwargs):
        return self.inner(src_tokens, src_lengths, prev_output_tokens, **kwargs)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None):
        self.retriever.check_model(self.inner)
        logits = net_output[0]
        g = self.capture.take()
        if g.size(1) != logits.size(1):  # the generator keeps only the last step's logits
            g = g[:, -logits.size(1):]
        tok_lprobs = at_least_float32(self.inner.get_normalized_probs(net_output, log_probs=True, sample=sample))
        scores = at_least_float32(logits)
        bsz, steps, dim = g.shape
        t0 = time.perf_counter()
        query = at_least_float32(g)
        # adaptive retrieval: the skip rule (if any) reads the model's distribution
        found = self.retriever.search(query.reshape(-1, dim), None, tok_lprobs.reshape(bsz * steps, -1))
        t1 = time.perf_counter()
        x = ScoringInputs.external_only(
            scores, scores[..., 0] - tok_lprobs[..., 0], query,
            found.scores.view(bsz, steps, -1), found.values.view(bsz, steps, -1), tok_lprobs=tok_lprobs,
        )
        lprobs = self.combiner.log_probs(x)
        self.timings["search"] += t1 - t0
        self.timings["combine"] += time.perf_counter() - t1
        return lprobs if log_probs else lprobs.exp()



def load_metak(path: Optional[str], flag: str = "--eval-combiner"):
    """A Meta-k network saved by ``trime-train-metak`` (adaptive kNN-MT)."""
    import torch

    from trime_fairseq.memory.adaptive import MetaK

    if not path:
        raise TrimeUserError(f"{flag} adaptive needs --metak-path (train it with trime-train-metak)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TrimeUserError(f"--metak-path {path}: no such file") from None
    net = MetaK(**saved["config"])
    net.load_state_dict(saved["state_dict"])
    return net.eval()
