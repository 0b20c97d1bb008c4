"""``--task trime_lm``: fairseq's language modelling task plus the flags for memories.

Training: batches are fairseq's (local memory); ``trime_loss`` reads the layout.
Evaluation (``fairseq-eval-lm --task trime_lm``): ``--eval-combiner`` picks how memory is
used (``none``, ``trime`` = Eq. 6, ``cache`` = continuous cache) and ``--eval-memory`` which
memory (``local``: the context window and the earlier tokens of the block).
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from trime_fairseq.memory.combiners import CacheCombiner, Combiner, NoMemory, TrimeCombiner
from trime_fairseq.models.memory_eval import MemoryEvalModel

logger = logging.getLogger(__name__)

EVAL_COMBINERS = ChoiceEnum(["none", "trime", "cache"])
EVAL_MEMORIES = ChoiceEnum(["local"])
CACHE_REPRESENTATIONS = ChoiceEnum(["f", "g"])


@dataclass
class TrimeLMConfig(LanguageModelingConfig):
    eval_combiner: EVAL_COMBINERS = field(
        default="none",
        metadata={
            "help": "how fairseq-eval-lm uses memory: none (vanilla LM), trime (Eq. 6, "
            "one softmax over vocabulary and memory, temperature --eval-temperature) or "
            "cache (continuous cache of Grave et al. 2017, needs --cache-lambda and "
            "--cache-theta)"
        },
    )
    eval_memory: EVAL_MEMORIES = field(
        default="local",
        metadata={
            "help": "which memory the combiner reads: local = the --context-window tokens "
            "and the earlier tokens of the scored block, each labelled with its next token"
        },
    )
    eval_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature tau of Eq. 6: memory scores are sim(q, k) / tau"},
    )
    cache_lambda: Optional[float] = field(
        default=None,
        metadata={"help": "continuous cache: interpolation weight lambda of P_cache (0..1)"},
    )
    cache_theta: Optional[float] = field(
        default=None,
        metadata={"help": "continuous cache: flatness theta, P_cache ∝ Σ exp(theta h.h_j)"},
    )
    cache_representation: CACHE_REPRESENTATIONS = field(
        default="f",
        metadata={
            "help": "continuous cache: hidden state h, f = decoder output (Grave et al.) "
            "or g = input of the last feed-forward block"
        },
    )


def build_combiner(cfg) -> Combiner:
    """The combiner that the ``--eval-*`` / ``--cache-*`` flags ask for (clear errors)."""
    kind = str(cfg.eval_combiner)
    if kind == "none":
        return NoMemory()
    if kind == "trime":
        return TrimeCombiner(temperature=cfg.eval_temperature)
    if cfg.cache_lambda is None or cfg.cache_theta is None:
        raise ValueError("--eval-combiner cache needs both --cache-lambda and --cache-theta")
    return CacheCombiner(cfg.cache_lambda, cfg.cache_theta, str(cfg.cache_representation))


@register_task("trime_lm", dataclass=TrimeLMConfig)
class TrimeLanguageModelingTask(LanguageModelingTask):
    """Language modelling with TRIME memories (see module docstring)."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None) -> None:
        super().__init__(args, dictionary, output_dictionary, targets=targets)
        self.combiner = build_combiner(args)

    def build_model(self, args, from_checkpoint: bool = False):
        model = super().build_model(args, from_checkpoint)
        # only models loaded for scoring (fairseq-eval-lm & co.) are wrapped, never the
        # model being trained
        if not from_checkpoint or isinstance(self.combiner, NoMemory):
            return model
        logger.info("scoring with memory: %s over %s memory", self.combiner.describe(), self.args.eval_memory)
        return MemoryEvalModel(model, self.combiner, self.source_dictionary.pad())

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
