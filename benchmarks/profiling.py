"""Where a step's time goes: ``torch.profiler`` operator times, their growth over a baseline,
and the best-of-N time of a piece of work (the bounds)."""
import time
from collections import Counter
from typing import Callable, Dict, Tuple


def profile_operators(fn: Callable[[], object]) -> Tuple[Counter, Dict[str, float]]:
    """Runs ``fn`` once under ``torch.profiler`` (CPU activity; on a GPU this is the host
    side). Returns the dispatched operators' names counted, and each operator's own CPU time
    in ms (largest first, those under 0.01 ms left out)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = Counter(e.name for e in prof.events())
    own = sorted(((e.key, e.self_cpu_time_total / 1000) for e in prof.key_averages()), key=lambda kv: -kv[1])
    return names, {k: round(v, 3) for k, v in own if v >= 0.01}


def extra_time_split(base_ms: Dict[str, float], mine_ms: Dict[str, float], top: int = 6) -> dict:
    """The operator time one variant spends beyond a baseline's (ms): the total growth and the
    ``top`` operators that grew the most."""
    diff = {k: mine_ms.get(k, 0.0) - base_ms.get(k, 0.0) for k in set(base_ms) | set(mine_ms)}
    return {"extra_ms": round(sum(mine_ms.values()) - sum(base_ms.values()), 2),
            "base_ms": round(sum(base_ms.values()), 2),
            "top": {k: round(v, 2) for k, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top]}}


def best_seconds(fn: Callable[[], object], repeats: int = 3, sync: Callable[[], None] = lambda: None) -> float:
    """The fastest of ``repeats`` runs of ``fn`` (``sync`` before and after each, e.g. to wait
    for queued CUDA work)."""
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best
