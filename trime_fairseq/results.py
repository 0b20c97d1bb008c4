"""Writing results atomically: JSON with its markdown beside it, text files, figures.

Used by every command and script that writes a result a reader may open while it is being
written (``trime-tune``, ``trime-analyze``, the benchmarks and examples): each file is written
to a temporary name and renamed into place.
"""
import json
import os
from pathlib import Path


def write_results(path_json: Path, result: dict, markdown: str) -> None:
    """``result`` as JSON and ``markdown`` beside it (``.md``), atomically."""
    atomic_write(path_json, json.dumps(result, indent=2, default=str))
    atomic_write(path_json.with_suffix(".md"), markdown + "\n")


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, path, dpi: int = 120) -> None:
    """Write a matplotlib figure atomically (temporary file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
