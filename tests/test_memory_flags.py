"""``--eval-memory`` parsed once into :class:`EvalMemory`, with its checks in one place."""
from types import SimpleNamespace

import pytest

from trime_fairseq.errors import TrimeUserError
from trime_fairseq.tasks.memory_flags import EVAL_MEMORY_CHOICES, EvalMemory


def args(memory="local", combiner="trime", size=0, datastore=None):
    return SimpleNamespace(eval_memory=memory, eval_combiner=combiner, long_memory_size=size, datastore=datastore)


def test_each_value_parses_to_its_memories():
    parsed = {m: EvalMemory.from_args(args(m, size=100, datastore="ds")) for m in EVAL_MEMORY_CHOICES}
    assert {m: (e.long, e.ext) for m, e in parsed.items()} == {
        "local": (False, False), "local+long": (True, False), "local+ext": (False, True),
        "local+long+ext": (True, True)}
    assert [parsed[m].describe() for m in EVAL_MEMORY_CHOICES] == list(EVAL_MEMORY_CHOICES)
    # the size only counts where long-term memory is used
    assert parsed["local"].long_size == 0 and parsed["local+long+ext"].long_size == 100
    # kNN-LM reads the datastore whatever --eval-memory says
    assert EvalMemory.from_args(args("local", "knn", datastore="ds")).ext


@pytest.mark.parametrize("memory", ["local+long", "local+long+ext"])
def test_long_memory_needs_a_size_with_or_without_ext(memory):
    with pytest.raises(TrimeUserError, match="needs --long-memory-size > 0"):
        EvalMemory.from_args(args(memory, size=0, datastore="ds"))


@pytest.mark.parametrize("memory", ["local+long", "local+long+ext"])
def test_long_memory_is_refused_in_several_processes(memory):
    parsed = EvalMemory.from_args(args(memory, size=10, datastore="ds"))
    parsed.check_processes(1)
    with pytest.raises(TrimeUserError, match="one process"):
        parsed.check_processes(2)
    EvalMemory.from_args(args("local+ext", datastore="ds")).check_processes(2)  # no long memory: fine


def test_bad_values_are_one_line_errors():
    with pytest.raises(TrimeUserError, match="needs --datastore"):
        EvalMemory.from_args(args("local+ext"))
    with pytest.raises(TrimeUserError, match="--long-memory-size must be >= 0"):
        EvalMemory.from_args(args("local", size=-1))
    with pytest.raises(TrimeUserError, match="choose from"):
        EvalMemory.from_args(args("long"))


def test_one_combiner_registry_for_lm_and_mt():
    from trime_fairseq.memory.combiners import CacheCombiner, KnnCombiner, NoMemory, TrimeCombiner
    from trime_fairseq.tasks.memory_flags import build_combiner
    from trime_fairseq.tasks.trime_translation import combiner_flag

    base = dict(eval_temperature=1.5, knn_lambda=0.3, knn_temperature=10.0, knn_k=8, datastore="ds",
                cache_lambda=None, cache_theta=None, metak_path=None)
    lm = SimpleNamespace(eval_combiner="knn", **base)
    mt = SimpleNamespace(eval_combiner="knn", mt_combiner=None, **base)
    old = SimpleNamespace(eval_combiner="none", mt_combiner="knn", **base)  # the old flag name still works
    for cfg in (lm, mt, old):
        made = build_combiner(cfg, *combiner_flag(cfg)) if hasattr(cfg, "mt_combiner") else build_combiner(cfg)
        assert isinstance(made, KnnCombiner) and made.lam == 0.3
    assert isinstance(build_combiner(lm, "none"), NoMemory)
    assert isinstance(build_combiner(lm, "trime"), TrimeCombiner)
    with_cache = SimpleNamespace(**{**base, "cache_lambda": 0.2, "cache_theta": 0.1, "eval_combiner": "cache"})
    assert isinstance(build_combiner(with_cache), CacheCombiner)
    # errors name the flag the user typed
    no_lambda = {**base, "knn_lambda": None}
    with pytest.raises(TrimeUserError, match="^--mt-combiner knn needs --knn-lambda"):
        build_combiner(SimpleNamespace(**no_lambda), *combiner_flag(SimpleNamespace(eval_combiner="none", mt_combiner="knn", **no_lambda)))
    with pytest.raises(TrimeUserError, match="^--eval-combiner knn needs --knn-lambda"):
        build_combiner(SimpleNamespace(**no_lambda), *combiner_flag(SimpleNamespace(eval_combiner="knn", mt_combiner=None, **no_lambda)))
    with pytest.raises(TrimeUserError, match="--eval-combiner adaptive needs --metak-path"):
        build_combiner(SimpleNamespace(eval_combiner="adaptive", **base))


class _Recorder:
    """A criterion that records the memory spec of the batch it is given."""

    def __init__(self):
        self.specs = []

    def __call__(self, model, sample):
        import torch

        self.specs.append(sample.get("trime_memory"))
        return torch.zeros((), requires_grad=True) * 1.0, 1, {}


class _Model:
    def train(self):
        return self

    def set_num_updates(self, n):
        pass


class _Optimizer:
    def backward(self, loss):
        loss.backward()


@pytest.mark.parametrize("task_name", ["lm", "mt"])
def test_placeholder_batches_are_marked_for_lm_and_mt(task_name):
    """fairseq's dummy batch (``ignore_grad``) on a worker without data must never enter the
    memory other workers gather: both tasks mark its spec, and the criterion then keeps it
    out (``external_memory_across_workers(share=False)``, tested in test_distributed)."""
    import torch

    from trime_fairseq.memory.in_batch import MemorySpec
    from trime_fairseq.tasks.trime_lm import TrimeLanguageModelingTask
    from trime_fairseq.tasks.trime_translation import TrimeTranslationTask

    cls = TrimeLanguageModelingTask if task_name == "lm" else TrimeTranslationTask
    task = object.__new__(cls)
    task.cfg = task.args = SimpleNamespace(mt_local_memory=False)
    target = torch.ones(3, 4, dtype=torch.long)
    for ignore_grad in (False, True):
        sample = {"target": target, "trime_memory": MemorySpec.external().to_sample()}
        crit = _Recorder()
        task.train_step(sample, _Model(), crit, _Optimizer(), 0, ignore_grad=ignore_grad)
        spec = MemorySpec.from_sample(crit.specs[-1])
        assert spec.mode == "external" and spec.placeholder is ignore_grad


def test_memory_spec_round_trips_through_the_sample():
    import torch

    from trime_fairseq.memory.in_batch import MemorySpec

    long = MemorySpec.long(3, torch.tensor([0, 0, 1]))
    back = MemorySpec.from_sample(long.to_sample())
    assert back.mode == "long" and back.segments_per_group == 3 and torch.equal(back.row_doc, long.row_doc)
    assert MemorySpec.from_sample(None).mode == "local"
    with pytest.raises(ValueError, match="unknown in-batch memory mode"):
        MemorySpec.from_sample({"mode": "global"})
    with pytest.raises(ValueError, match="row_doc"):
        MemorySpec("long", segments_per_group=2)
