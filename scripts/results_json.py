"""Write the JSON beside a results page (``docs/results/X.md`` -> ``X.json``) from the page's
own markdown tables, for pages whose example predates writing JSON itself.

Every table becomes a list of row objects keyed by its (normalised) column names; ``rows`` is
the first table, each row with ``system`` (its first cell) and numbers parsed (``1,234.5``,
``**58.30**`` -> float), so ``valid ppl`` becomes ``valid_ppl``. Usage::

    python scripts/results_json.py docs/results/long_memory.md [more pages ...]
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trime_fairseq.results import atomic_write  # noqa: E402


def _key(header: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", header.strip().lower()).strip("_") or "column"


def _value(cell: str):
    text = cell.strip().strip("*").strip()
    number = text.replace(",", "")
    try:
        return float(number)
    except ValueError:
        return text


def tables(markdown: str):
    """Every ``| a | b |`` table of ``markdown`` as a list of dicts."""
    out, lines = [], markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            headers = [_key(h) for h in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c for c in lines[i].strip().strip("|").split("|")]
                rows.append({h: _value(c) for h, c in zip(headers, cells)})
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def page_json(page: Path) -> dict:
    found = tables(page.read_text())
    if not found:
        raise SystemExit(f"error: {page} has no markdown table")
    rows = [{"system": next(iter(r.values())), **r} for r in found[0]]
    return {"source": page.name, "generated_by": "scripts/results_json.py", "rows": rows, "tables": found}


if __name__ == "__main__":
    for name in sys.argv[1:]:
        page = Path(name)
        atomic_write(page.with_suffix(".json"), json.dumps(page_json(page), indent=2) + "\n")
        print(page.with_suffix(".json"))
