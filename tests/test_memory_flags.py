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
