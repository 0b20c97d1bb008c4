"""``trime-inspect``: per-entry contributions, agreement with fairseq-eval-lm, and
that every memory entry it shows points at a real position whose next token is its label."""
import json
import math
import re

import numpy as np
import pytest
import torch

from conftest import USER_DIR
from helpers import make_dictionary, make_model, run_cli
from trime_fairseq.data.stream import StreamBlocks, TokenStream
from trime_fairseq.memory.combiners import CacheCombiner, KnnCombiner, NoMemory, TrimeCombiner
from trime_fairseq.models.memory_eval import MemoryEvalModel, scoring_inputs

EV = ["--tokens-per-sample", "24", "--context-window", "8", "--gen-subset", "valid", "--cpu"]


# --- Contributions: the final distribution rebuilt from the per-entry masses ------------------


def scoring_batch(seed=0):
    """ScoringInputs with local, long-term and external entries (some missing) on a tiny model."""
    from test_eval_memory import context_window_sample

    d = make_dictionary(30)
    model = make_model(d).double()
    sample = context_window_sample(d, seed=seed)
    x = scoring_inputs(model, MemoryEvalModel(model, NoMemory(), d.pad())(**sample["net_input"]), sample, d.pad())
    x = x.queries(4, x.target.size(1))
    g = torch.Generator().manual_seed(seed)
    b, t, dim = x.query_g.shape
    m, k = 5, 6
    long_g = torch.randn(b, m, dim, generator=g, dtype=torch.float64)
    long_f = torch.randn(b, m, x.query_f.size(-1), generator=g, dtype=torch.float64)
    labels = torch.randint(d.nspecial, d.nspecial + 8, (b, m), generator=g)
    x = x.with_long_memory(long_g, long_f, labels, torch.rand(b, t, m, generator=g) > 0.3)
    ext_scores = torch.randn(b, t, k, generator=g, dtype=torch.float64) * 3
    ext_scores[0, 0, 3:] = float("-inf")  # fewer neighbours found
    ext_scores[1, 2, :] = float("-inf")  # none found
    ext_labels = torch.randint(d.nspecial, d.nspecial + 8, (b, t, k), generator=g)
    return x.with_external(ext_scores, ext_labels), d


@pytest.mark.parametrize("combiner", [
    TrimeCombiner(0.8), TrimeCombiner(1.2, lam=0.3, memory_temperature=2.0),
    TrimeCombiner(1.2, lam=0.3, memory_temperature=2.0, memory_distribution="all-scaled"), CacheCombiner(0.3, 0.05, "f"),
    CacheCombiner(0.2, 0.1, "g"), KnnCombiner(0.4, 2.0), KnnCombiner(0.3, 1.0, CacheCombiner(0.2, 0.05, "f")),
], ids=["trime", "trime_appF", "trime_appF_all", "cache_f", "cache_g", "knn", "knn_cache"])
def test_contributions_rebuild_the_combiners_distribution(combiner):
    """P(w) = (1 - Σ_j c_j) P_LM(w) + Σ_{label_j = w} c_j, for every word and query."""
    x, d = scoring_batch()
    c = combiner.contributions(x)
    w = c.log_weight.exp()
    assert w.shape == c.labels.shape == c.similarity.shape
    assert c.num_shared == x.key_labels.size(-1)
    total = w.sum(-1, keepdim=True)
    rebuilt = (1 - total) * x.tok_log_probs().exp()
    rebuilt = rebuilt.scatter_add(-1, c.labels, w)
    torch.testing.assert_close(rebuilt, combiner.log_probs(x).exp(), atol=1e-10, rtol=1e-8)
    # entries the combiner does not read carry nothing
    if isinstance(combiner, CacheCombiner):
        assert not torch.isfinite(c.log_weight[..., c.num_shared:]).any()
    if isinstance(combiner, KnnCombiner) and combiner.cache is None:
        assert not torch.isfinite(c.log_weight[..., :c.num_shared]).any()
    assert not torch.isfinite(c.log_weight[1, 2, c.num_shared:]).any()  # nothing was retrieved there


def test_no_memory_has_no_contributions():
    x, _ = scoring_batch()
    assert NoMemory().contributions(x) is None


# --- end to end against fairseq-eval-lm --------------------------------------------------------


def eval_lm_word_scores(data, ckpt, flags, ev=EV):
    """``{stream position of the target: log-prob}`` from ``fairseq-eval-lm --output-word-probs``."""
    proc = run_cli(["fairseq_cli.eval_lm", str(data), "--path", str(ckpt), "--user-dir", USER_DIR,
                    "--task", "trime_lm", "--output-word-probs", "--max-tokens", "256", *ev, *flags])
    stream = split_stream(data, "valid")
    tps, ctx = (int(ev[ev.index(f) + 1]) for f in ("--tokens-per-sample", "--context-window"))
    blocks = StreamBlocks(stream, tps - ctx, ctx, 1)
    out = {}
    for line in (proc.stderr + proc.stdout).splitlines():
        m = re.search(r"fairseq_cli\.eval_lm(?: \| |:)(\d+) (.*)$", line)
        if not m or "[" not in m.group(2):
            continue
        scores = [float(v) for v in re.findall(r" \[(-?[0-9.]+(?:e-?\d+)?|-?inf)\]", m.group(2))]
        first = int(blocks.starts[int(m.group(1))])
        for k, v in enumerate(scores):
            out[first + k + 1] = v
    assert out, proc.stderr[-2000:]
    return out, stream


def split_stream(data, split):
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(data / "dict.txt"))
    return TokenStream.from_lines(data_utils.load_indexed_dataset(str(data / split), d), d.eos())


def longest_doc(stream):
    """The longest document after the first (its first block also holds the previous one)."""
    ends = np.append(stream.doc_starts[1:], len(stream))
    return 1 + int(np.argmax((ends - stream.doc_starts)[1:]))


def run_inspect(data, ckpt, flags, out, doc, ev=EV):
    from trime_fairseq.cli import inspect as ins

    return ins.main([str(data), "--path", str(ckpt), "--user-dir", USER_DIR, *ev, *flags, "--doc", str(doc),
                     "--out", str(out), "--top-entries", "6"])


def check_page(page, ref, stream, ds_values=None, train_stream=None):
    """Per-token log-probs equal eval-lm's; every entry points at a real position whose next
    token is its label (Memorizing: an earlier position of the document holding that token)."""
    scored = [t for t in page["tokens"] if t["scored"]]
    assert scored
    ours = sum(t["lp_with"] for t in scored)
    theirs = sum(ref[t["pos"]] for t in scored)
    assert ours == pytest.approx(theirs, abs=1e-4 * len(scored))
    for t in scored:
        assert t["lp_with"] == pytest.approx(ref[t["pos"]], abs=2e-5)
        assert t["id"] == int(stream.ids(t["pos"], t["pos"] + 1)[0])
        assert sum(t["shares"].values()) == pytest.approx(1.0, abs=1e-4) if t["shares"] else True
        query = t["pos"] - 1  # source position of this prediction
        for e in t["entries"]:
            if e["kind"] in ("ext", "datastore"):
                assert e["label_id"] == int(train_stream.ids(e["pos"] + 1, e["pos"] + 2)[0]) == int(ds_values[e["pos"]])
            elif e["kind"] == "knn-memory":
                assert e["pos"] < query and e["label_id"] == int(stream.ids(e["pos"], e["pos"] + 1)[0])
                assert stream.docs_at(np.array([e["pos"]]))[0] == stream.docs_at(np.array([query]))[0]
            else:
                assert 0 <= e["pos"] < query, e
                assert e["label_id"] == int(stream.ids(e["pos"] + 1, e["pos"] + 2)[0])
                if e["kind"] in ("long", "cache-long"):  # long-term: same document, before the block's context
                    assert stream.docs_at(np.array([e["pos"]]))[0] == stream.docs_at(np.array([query]))[0]
    return scored


@pytest.fixture(scope="module")
def datastore(tiny_lm, tmp_path_factory):
    from trime_fairseq.cli import build_datastore as bd

    data, ckpt, _ = tiny_lm
    out = tmp_path_factory.mktemp("ds_inspect") / "train"
    bd.main([str(data), "--path", str(ckpt), "--gen-subset", "train", "--out", str(out), "--key-dtype", "float32",
             "--recall-k", "8", "--recall-queries", "50", "--tokens-per-sample", "64", "--context-window", "32",
             "--cpu", "--max-tokens", "256"])
    return out


CONFIGS = {
    "none": [],
    "cache_long": ["--eval-combiner", "cache", "--cache-lambda", "0.3", "--cache-theta", "0.2",
                   "--eval-memory", "local+long", "--long-memory-size", "30"],
    "trime_local_long_ext": ["--eval-combiner", "trime", "--eval-temperature", "0.9", "--eval-memory",
                             "local+long+ext", "--long-memory-size", "30", "--knn-k", "8"],
    "knn_cache": ["--eval-combiner", "knn", "--knn-lambda", "0.3", "--knn-temperature", "2", "--knn-k", "8",
                  "--cache-lambda", "0.1", "--cache-theta", "0.2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_inspect_agrees_with_eval_lm_and_entries_are_real(name, tiny_lm, datastore, tmp_path):
    from trime_fairseq.memory.datastore import Datastore

    data, ckpt, _ = tiny_lm
    flags = list(CONFIGS[name])
    ext = "ext" in " ".join(flags) or "knn" in name
    if ext:
        flags += ["--datastore", str(datastore)]
    ref, stream = eval_lm_word_scores(data, ckpt, flags)
    doc = longest_doc(stream)
    page = run_inspect(data, ckpt, flags, tmp_path / "page.html", doc)
    ds = Datastore(str(datastore)) if ext else None
    train = split_stream(data, "train") if ext else None
    scored = check_page(page, ref, stream, ds.values if ds else None, train)
    a = int(stream.doc_starts[doc])
    b = int(stream.doc_starts[doc + 1]) if doc + 1 < stream.num_docs else len(stream)
    assert [t["pos"] for t in page["tokens"]] == list(range(a, b))
    assert len(scored) == b - a - 1  # all but the first token: queries inside the document
    kinds = {e["kind"] for t in scored for e in t["entries"]}
    shares = {k for t in scored for k in t["shares"]}
    expected = {"none": set(), "cache_long": {"cache", "cache-long"}, "trime_local_long_ext": {"local", "long", "ext"},
                "knn_cache": {"datastore", "cache"}}[name]
    assert kinds == expected and shares == (expected | {"model"} if expected else set())
    # the page and its JSON hold the same data; the page needs nothing from the network
    html = (tmp_path / "page.html").read_text()
    assert json.loads((tmp_path / "page.json").read_text())["summary"] == page["summary"]
    assert "http://" not in html and "https://" not in html and "<script src" not in html
    s = page["summary"]
    lp0 = [t["lp_without"] for t in scored]
    assert s["ppl_without"] == pytest.approx(math.exp(-sum(lp0) / len(lp0)))
    if name == "none":
        assert s["ppl_with"] == pytest.approx(s["ppl_without"]) and not s["most_helped"]
    else:
        helped = sorted((t["gain_bits"] for t in scored if t["gain_bits"] > 0), reverse=True)[:20]
        assert [h["gain_bits"] for h in s["most_helped"]] == pytest.approx(helped)


@pytest.fixture(scope="module")
def memorizing_ckpt(tiny_lm, tmp_path_factory):
    data = tiny_lm[0]
    out = tmp_path_factory.mktemp("mem_inspect")
    run_cli(["fairseq_cli.train", str(data), "--user-dir", USER_DIR, "--task", "trime_lm",
             "--arch", "memorizing_transformer_lm_tiny", "--memorizing-memory-size", "64", "--memorizing-topk", "4",
             "--criterion", "cross_entropy", "--stream-batching", "--batch-size", "4", "--tokens-per-sample", "16",
             "--optimizer", "adam", "--lr", "3e-3", "--max-update", "4", "--save-dir", str(out),
             "--no-epoch-checkpoints", "--cpu"])
    return out / "checkpoint_last.pt"


@pytest.mark.slow
def test_inspect_memorizing_transformer(tiny_lm, memorizing_ckpt, tmp_path):
    data = tiny_lm[0]
    ev = ["--tokens-per-sample", "16", "--context-window", "8", "--gen-subset", "valid", "--cpu"]  # as trained
    ref, stream = eval_lm_word_scores(data, memorizing_ckpt, [], ev)
    base, _ = eval_lm_word_scores(data, memorizing_ckpt, ["--model-overrides", "{'memorizing_memory_size': 0}"], ev)
    doc = longest_doc(stream)
    page = run_inspect(data, memorizing_ckpt, [], tmp_path / "mt.html", doc, ev)
    scored = check_page(page, ref, stream)
    for t in scored:  # "without memory": the same weights with the kNN memory off
        assert t["lp_without"] == pytest.approx(base[t["pos"]], abs=2e-5)
    entries = [e for t in scored for e in t["entries"]]
    assert entries and {e["kind"] for e in entries} == {"knn-memory"}
    assert {e["head"] for e in entries} <= set(range(len(page["summary"]["gates"])))
    assert all(0 < g < 1 for g in page["summary"]["gates"])


def test_page_is_self_contained_and_summarizes_its_tokens(tmp_path):
    """The page embeds its data (safe inside <script>) and the summary follows the tokens."""
    from trime_fairseq.cli.inspect import MODEL, summarize, write_outputs

    toks = []
    for i, (lp0, lp1, share) in enumerate([(-3.0, -1.0, 0.6), (-1.0, -2.0, 0.1), (-2.0, -2.0, 0.0), (-4.0, -0.5, 0.9)]):
        toks.append({"i": i, "pos": i + 1, "id": 5, "text": f" w</script>{i}", "scored": True, "lp_without": lp0,
                     "lp_with": lp1, "gain_bits": (lp1 - lp0) / math.log(2), "freq": [20000, 5, 50, 5][i],
                     "shares": {"local": share, MODEL: 1 - share}, "entries": [], "top_with": [], "top_without": []})
    s = summarize(toks, [10000, 1000, 100, 10], top_n=2)
    assert s["ppl_with"] == pytest.approx(math.exp(5.5 / 4)) and s["ppl_without"] == pytest.approx(math.exp(10 / 4))
    assert [h["i"] for h in s["most_helped"]] == [3, 0]
    assert s["by_kind"] == [{"kind": "local", "mean_share": pytest.approx(0.4), "tokens_led": 3,
                             "bits_gained_led": pytest.approx((2 - 1 + 3.5) / math.log(2))}]
    rows = {r["bucket"]: r for r in s["by_frequency"]}
    assert rows[">10000"]["tokens"] == 1 and rows["<=10"]["tokens"] == 2 and rows["10-100"]["tokens"] == 1
    data = {"meta": {"title": "t", "where": "valid document 0", "kinds": ["local"]}, "summary": s, "tokens": toks}
    html, js = write_outputs(data, str(tmp_path / "p.html"))
    page = html.read_text()
    assert page.count("</script>") == 2  # the data cannot close its own <script>
    assert json.loads(js.read_text())["tokens"][0]["text"] == " w</script>0"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_bad_flags_give_one_line_errors(tiny_lm, tmp_path, capsys):
    from trime_fairseq.cli import inspect as ins

    data, ckpt, _ = tiny_lm
    with pytest.raises(SystemExit):
        ins.main([str(data), "--path", str(ckpt), *EV, "--doc", "999", "--out", str(tmp_path / "p.html")])
    assert "--doc 999" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit):
        ins.main([str(data), "--path", str(ckpt), *EV, "--text", str(tmp_path / "missing.txt"),
                  "--out", str(tmp_path / "p.html")])
    assert "--text" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "p.html").exists()


@pytest.mark.slow
def test_text_file_is_scored_like_a_document(tiny_lm, tmp_path):
    """--text: the tokens of a file, each line closed by </s>; the same model scores them."""
    from trime_fairseq.cli import inspect as ins

    data, ckpt, _ = tiny_lm
    text = tmp_path / "doc.txt"
    text.write_text("w1 w2 the w3 w1 w2 the w3\nw1 w2 the unknownword\n")
    page = ins.main([str(data), "--path", str(ckpt), *EV, "--eval-combiner", "trime", "--text", str(text),
                     "--out", str(tmp_path / "t.html")])
    toks = page["tokens"]
    assert [t["text"].strip() for t in toks][:4] == ["w1", "w2", "the", "w3"]
    assert len(toks) == 14 and not toks[0]["scored"] and all(t["scored"] for t in toks[1:])
    assert toks[8]["text"] == "\n" and toks[-2]["text"].strip() == "<unk>"
    # the repeated phrase is found in local memory, at its first occurrence
    second = toks[5]  # "w2" after the second "w1"
    assert any(e["kind"] == "local" and e.get("link") == 1 for e in second["entries"])
