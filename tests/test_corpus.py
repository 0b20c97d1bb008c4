"""Tests of the LM corpus builder (trime_fairseq.prepare.lm, trime_fairseq.cli.prepare_lm)."""

import importlib.util
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from trime_fairseq.cli.prepare_lm import main
from trime_fairseq.prepare import lm as C

HAS_FAIRSEQ = importlib.util.find_spec("fairseq_cli") is not None


def make_docs(n):
    return [C.Document(f"doc{i:03d}", (f"line one of {i}", f"line two of {i}")) for i in range(n)]


def write_folder(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i}.txt").write_text(f"doc {i} first line\n\n  doc {i}   second line \n")
    return root


def blank_line_structure_ok(path: Path) -> bool:
    """No leading/trailing/double empty lines; file ends with a newline."""
    text = path.read_text()
    lines = text.split("\n")
    return (
        text.endswith("\n")
        and not text.endswith("\n\n")
        and lines[0] != ""
        and "\n\n\n" not in text
    )


# --------------------------------------------------------------------------- splitting


def test_split_is_by_document_disjoint_complete_and_deterministic():
    docs = make_docs(50)
    a = C.split_documents(docs, 0.1, 0.1, seed=1)
    b = C.split_documents(list(reversed(docs)), 0.1, 0.1, seed=1)  # input order irrelevant
    names = {s: [d.name for d in a[s]] for s in C.SPLITS}
    assert names == {s: [d.name for d in b[s]] for s in C.SPLITS}
    assert len(names["valid"]) == 5 and len(names["test"]) == 5 and len(names["train"]) == 40
    all_names = names["train"] + names["valid"] + names["test"]
    assert sorted(all_names) == [d.name for d in docs]  # disjoint and covering
    # documents are kept whole
    by_name = {d.name: d for d in docs}
    assert all(d == by_name[d.name] for s in C.SPLITS for d in a[s])
    c = C.split_documents(docs, 0.1, 0.1, seed=2)
    assert [d.name for d in c["valid"]] != names["valid"]


def test_split_minimum_one_doc_and_errors():
    parts = C.split_documents(make_docs(3), 0.05, 0.05, seed=1)
    assert [len(parts[s]) for s in C.SPLITS] == [1, 1, 1]
    with pytest.raises(C.CorpusError, match="too few documents"):
        C.split_documents(make_docs(2), 0.05, 0.05)
    with pytest.raises(C.CorpusError, match="--valid-frac"):
        C.split_documents(make_docs(10), 0.0, 0.05)
    dup = make_docs(5) + [C.Document("doc001", ("x",))]
    with pytest.raises(C.CorpusError, match="duplicate"):
        C.split_documents(dup)


def test_split_max_docs_is_a_seeded_subset():
    docs = make_docs(40)
    parts = C.split_documents(docs, 0.1, 0.1, seed=1, max_docs=10)
    assert sum(len(parts[s]) for s in C.SPLITS) == 10
    again = C.split_documents(docs, 0.1, 0.1, seed=1, max_docs=10)
    assert parts == again


# --------------------------------------------------------------------------- sources


def test_textfile_source_blocks(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\nfirst doc line 1\nfirst doc line 2\n\n \n\nsecond doc\n  \nthird  doc\tx\n")
    docs = C.load_documents(C.iter_textfile(path))
    assert [d.lines for d in docs] == [
        ("first doc line 1", "first doc line 2"),
        ("second doc",),
        ("third doc x",),
    ]
    assert [d.name for d in docs] == sorted(d.name for d in docs)


def test_folder_source(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("alpha text\n")
    (root / "sub" / "b.md").write_text("# beta\n\nbody\n")
    (root / "sub" / "c.rst").write_text("Gamma\n=====\n\n.. _label:\n\ngamma body\n")
    (root / "skip.py").write_text("print('no')\n")
    (root / ".hidden" / "d.txt").write_text("hidden\n")
    docs = {d.name: d.lines for d in C.load_documents(C.iter_folder(root))}
    assert docs == {
        "a.txt": ("alpha text",),
        "sub/b.md": ("# beta", "body"),
        "sub/c.rst": ("Gamma", "gamma body"),
    }


def test_wikitext_heading_split_keeps_subheadings(tmp_path):
    path = tmp_path / "wiki.train.tokens"
    path.write_text(
        " \n = Alpha = \n \n Alpha text . \n \n = = History = = \n \n More alpha . \n"
        " \n = = = Deep = = = \n Deeper . \n \n = Beta = \n \n Beta text . \n"
    )
    docs = C.load_documents(C.iter_wikitext(path, prefix="train"))
    assert [d.lines for d in docs] == [
        ("= Alpha =", "Alpha text .", "= = History = =", "More alpha .", "= = = Deep = = =", "Deeper ."),
        ("= Beta =", "Beta text ."),
    ]
    assert C.is_wikitext_title(" = Alpha = \n")
    assert not C.is_wikitext_title(" = = History = = \n")
    assert not C.is_wikitext_title(" a = b = c\n")


def test_clean_rest():
    text = (
        "=====\nTitle\n=====\n\n.. _my-label:\n\nSome   *prose* here.\n\nSection\n-------\n\n"
        ".. code-block:: python\n    :linenos:\n    :emphasize-lines: 2\n\n"
        "    x = 1\n    \"\"\"doc\"\"\"\n    ...\n\n"
        ".. method:: filter(*args, **kwargs)\n\n    Filters.\n\nSub\n~~~\n\n"
        ".. toctree::\n   :maxdepth: 2\n\n   intro\n\n======  =====\ncol a   col b\n======  =====\n"
    )
    lines = C.text_to_lines(C.clean_rest(text))
    assert lines == [
        "Title", "Some *prose* here.", "Section", "x = 1", '"""doc"""', "...",
        "filter(*args, **kwargs)", "Filters.", "Sub", "intro", "col a col b",
    ]


def make_sdist(path: Path, top: str, files: dict) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_django_sqlalchemy_from_cache_without_network(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    dj, sa = C.DJANGO_DOCS, C.SQLALCHEMY_DOCS
    make_sdist(cache / f"Django-{dj.version}.tar.gz", f"Django-{dj.version}", {
        "docs/intro/install.txt": "Install\n=======\n\nRun pip.\n",
        "docs/_theme/LICENSE.txt": "theme licence\n",
        "docs/requirements.txt": "sphinx\n",
        "django/__init__.py": "VERSION = 1\n",
    })
    make_sdist(cache / f"sqlalchemy-{sa.version}.tar.gz", f"sqlalchemy-{sa.version}", {
        "doc/build/orm/session.rst": ".. _session:\n\nSession\n-------\n\nUse it.\n",
        "doc/build/conf.py": "x = 1\n",
    })

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the sdists are cached")

    monkeypatch.setattr(C.subprocess, "run", no_network)
    docs = dict(C.iter_django_sqlalchemy(cache))
    assert {k: C.text_to_lines(v) for k, v in docs.items()} == {
        "django/docs/intro/install.txt": ["Install", "Run pip."],
        "sqlalchemy/doc/build/orm/session.rst": ["Session", "Use it."],
    }


# --------------------------------------------------------------------------- writing


def test_written_files_have_one_blank_line_between_documents(tmp_path):
    docs = [
        C.Document("a", ("one two", "three")),
        C.Document("b", ("four",)),
        C.Document("c", ("five six", "seven", "eight")),
    ]
    path = tmp_path / "train.txt"
    stats = C.write_documents(path, docs, C.WhitespaceTokenizer())
    assert path.read_text() == "one two\nthree\n\nfour\n\nfive six\nseven\neight\n"
    assert (stats.docs, stats.lines, stats.tokens) == (3, 6, 8)
    assert C.read_fairseq_documents(path) == [["one two", "three"], ["four"], ["five six", "seven", "eight"]]


def test_cli_folder_sentencepiece_text_only(tmp_path):
    root = write_folder(tmp_path / "in", n=12)
    out = tmp_path / "out"
    assert main(["--source", "folder", "--input", str(root), "--out", str(out),
                 "--vocab-size", "40", "--no-binarize", "--valid-frac", "0.1", "--test-frac", "0.1"]) == 0
    manifest = json.loads((out / "corpus.json").read_text())
    assert (out / "spm.model").is_file() and not (out / "bin").exists()
    assert not (out / "spm.train.raw").exists()
    assert [manifest["splits"][s]["docs"] for s in C.SPLITS] == [10, 1, 1]
    for split in C.SPLITS:
        path = out / f"{split}.txt"
        assert blank_line_structure_ok(path)
        docs = C.read_fairseq_documents(path)
        assert len(docs) == manifest["splits"][split]["docs"]
        assert all(len(d) == 2 for d in docs)  # two lines per source document, none merged
        assert sum(len(line.split()) for d in docs for line in d) == manifest["splits"][split]["tokens"]
        assert "\u2581" in path.read_text()  # sentencepiece pieces
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_cli_wikitext_keeps_given_splits(tmp_path):
    root = tmp_path / "wt"
    root.mkdir()
    for split, n in (("train", 3), ("valid", 1), ("test", 2)):
        text = "".join(f" \n = {split} {i} = \n \n {split} text {i} . \n \n = = Sub = = \n more . \n" for i in range(n))
        (root / f"wiki.{split}.tokens").write_text(text)
    out = tmp_path / "out"
    main(["--source", "wikitext103", "--input", str(root), "--out", str(out),
          "--tokenizer", "none", "--no-binarize"])
    manifest = json.loads((out / "corpus.json").read_text())
    assert [manifest["splits"][s]["docs"] for s in C.SPLITS] == [3, 1, 2]
    assert C.read_fairseq_documents(out / "valid.txt") == [
        ["= valid 0 =", "valid text 0 .", "= = Sub = =", "more ."]
    ]


@pytest.mark.skipif(not HAS_FAIRSEQ, reason="fairseq is not importable")
def test_cli_end_to_end_binarize_and_rerun(tmp_path, caplog):
    root = write_folder(tmp_path / "in", n=10)
    out = tmp_path / "out"
    argv = ["--source", "folder", "--input", str(root), "--out", str(out), "--tokenizer", "none"]
    assert main(argv) == 0
    for name in ("dict.txt", "train.bin", "train.idx", "valid.bin", "valid.idx", "test.bin", "test.idx"):
        assert (out / "bin" / name).is_file(), name
    manifest = json.loads((out / "corpus.json").read_text())
    assert sum(manifest["splits"][s]["docs"] for s in C.SPLITS) == 10
    # doc i has tokens: doc, i, first, line, second -> dict holds the train types
    dict_words = {line.split()[0] for line in (out / "bin" / "dict.txt").read_text().splitlines()}
    assert {"doc", "first", "line", "second"} <= dict_words
    assert manifest["vocab"]["fairseq_dict_entries"] == len(dict_words)
    for split in C.SPLITS:
        assert blank_line_structure_ok(out / f"{split}.txt")

    stamp = (out / "corpus.json").stat().st_mtime_ns
    main(argv)  # complete output with same settings: skipped
    assert (out / "corpus.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="different settings"):
        main(argv + ["--seed", "7"])
    main(argv + ["--seed", "7", "--force"])
    assert json.loads((out / "corpus.json").read_text())["config"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_module_is_runnable_with_help():
    import sys

    proc = subprocess.run([sys.executable, "-m", "trime_fairseq.cli.prepare_lm", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--max-docs" in proc.stdout and "--input-sentence-size" in proc.stdout


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make_argv, expected",
    [
        (lambda tmp: ["--source", "folder"], "--input is required"),
        (lambda tmp: ["--source", "folder", "--input", str(tmp / "nope")], "--input"),
        (lambda tmp: ["--source", "textfile", "--input", str(tmp)], "--input"),
        (lambda tmp: ["--source", "wikitext103", "--input", str(tmp)], "wiki.train.tokens"),
        (lambda tmp: ["--source", "folder", "--input", str(tmp)], "no documents found in --input"),
    ],
)
def test_bad_input_gives_clear_error(tmp_path, make_argv, expected):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as excinfo:
        main(make_argv(tmp_path) + ["--out", str(out), "--no-binarize", "--tokenizer", "none"])
    assert excinfo.value.code == 2
    message = str(excinfo.value)
    assert message.startswith("prepare_lm: error: ")
    assert "--input" in message and expected in message
    assert "\n" not in message
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_too_few_documents_error(tmp_path):
    root = write_folder(tmp_path / "in", n=2)
    with pytest.raises(SystemExit, match="too few documents"):
        main(["--source", "folder", "--input", str(root), "--out", str(tmp_path / "out"),
              "--tokenizer", "none", "--no-binarize"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --------------------------------------------------------------------------- de-duplication


def test_deduplicate_heldout_drops_documents_that_copy_train():
    import random

    rnd = random.Random(0)

    def text(n):
        return " ".join(f"w{rnd.randint(0, 500)}" for _ in range(n))

    train = [C.Document(f"t{i}", (text(60), text(60))) for i in range(6)]
    copy = C.Document("copy", train[2].lines + (text(5),))  # a train document and a few words more
    partial = C.Document("partial", (text(120), " ".join(train[4].lines)))  # 2nd segment is a copy
    fresh = C.Document("fresh", (text(80),))
    splits = {"train": train, "valid": [copy, fresh], "test": [partial, fresh]}
    out, report = C.deduplicate_heldout(splits, threshold=0.5, ngram=5, words=120)
    assert [d.name for d in out["valid"]] == ["fresh"] and [d.name for d in out["test"]] == ["fresh"]
    assert out["train"] == train
    assert report["valid"]["dropped_docs"] == 1 and report["test"]["near_duplicate_segments"] == 1
    with pytest.raises(C.CorpusError, match="dropped every valid"):
        C.deduplicate_heldout({"train": train, "valid": [copy], "test": [fresh]}, threshold=0.5, words=120)


def test_cli_dedup_is_off_by_default_and_recorded_when_on(tmp_path):
    root = write_folder(tmp_path / "in", n=12)
    for i in (0, 1):  # two documents copy another one's text
        (root / "b" / f"dup{i}.txt").write_text("doc 4 first line\n\n  doc 4   second line \n")
    base = ["--source", "folder", "--input", str(root), "--tokenizer", "none", "--no-binarize",
            "--valid-frac", "0.25", "--test-frac", "0.25", "--seed", "3"]
    main(base + ["--out", str(tmp_path / "plain")])
    plain = json.loads((tmp_path / "plain" / "corpus.json").read_text())
    assert "dedup" not in plain and "dedup_jaccard" not in plain["config"]  # old fingerprints unchanged
    main(base + ["--out", str(tmp_path / "dedup"), "--dedup-jaccard", "0.9", "--dedup-ngram", "3"])
    dedup = json.loads((tmp_path / "dedup" / "corpus.json").read_text())
    # seed 3 puts one copy in train and one in each of valid and test: both go
    assert (dedup["dedup"]["valid"]["dropped_docs"], dedup["dedup"]["test"]["dropped_docs"]) == (1, 1)
    held = [(tmp_path / d / f"{s}.txt").read_text() for d in ("plain", "dedup") for s in ("valid", "test")]
    assert all("doc 4 first line" in h for h in held[:2]) and not any("doc 4 first line" in h for h in held[2:])
    assert "doc 4 first line" in (tmp_path / "dedup" / "train.txt").read_text()
    assert (tmp_path / "dedup" / "train.txt").read_text() == (tmp_path / "plain" / "train.txt").read_text()
    assert dedup["config"]["dedup_jaccard"] == 0.9
    with pytest.raises(SystemExit, match="dedup-jaccard"):
        main(base + ["--out", str(tmp_path / "bad"), "--dedup-jaccard", "1.5"])


# --------------------------------------------------------------------------- linux-doc (long documents)


def test_group_chapters_splits_large_folders_and_drops_small_chapters():
    files = [("a/x.rst.txt", 40), ("a/y.rst.txt", 50),            # a: 90 words, one chapter
             ("b/one.rst.txt", 70), ("b/two.rst.txt", 70), ("b/three.rst.txt", 30),
             ("b/sub/p.rst.txt", 60), ("b/sub/q.rst.txt", 20),    # b: 250 > 100: split
             ("c/tiny.rst.txt", 5), ("top.rst.txt", 500)]
    chapters = dict(C.group_chapters(files, max_words=100, min_words=10))
    assert chapters == {
        "a": ["a/x.rst.txt", "a/y.rst.txt"],
        "b/*": ["b/one.rst.txt", "b/three.rst.txt"],     # b's own files, in path order, <= 100 words
        "b/*2": ["b/two.rst.txt"],
        "b/sub": ["b/sub/p.rst.txt", "b/sub/q.rst.txt"],
        "*": ["top.rst.txt"],                           # one file larger than max stays whole
    }  # c (5 words) is dropped
    everything = {p for _, ps in C.group_chapters(files, 100, 0) for p in ps}
    assert everything == {p for p, _ in files}  # without a minimum every file is in one chapter


def test_linux_doc_source_from_unpacked_package(tmp_path, monkeypatch):
    root = tmp_path / "pkg" / C.LINUX_DOC.sources_dir
    body = "\n".join(f"word{i} " * 10 for i in range(300))  # 3000 words per file
    for rel in ("admin/a.rst.txt", "admin/b.rst.txt", "net/c.rst.txt", "net/d.rst.txt", "net/e.rst.txt",
                "mm/f.rst.txt", "mm/g.rst.txt", "mm/h.rst.txt", "mm/i.rst.txt",
                "translations/zh/j.rst.txt", "small/k.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"Title {rel}\n=====\n\n{body}\n")
    monkeypatch.setattr(C, "LINUX_DOC", C.DebianChapters("linux-doc-6.1", C.LINUX_DOC.sources_dir,
                                                         exclude=("translations",), max_words=10_000,
                                                         min_words=2_500))

    def no_apt(*args, **kwargs):
        raise AssertionError("apt-get must not run when --input is given")

    monkeypatch.setattr(C.subprocess, "run", no_apt)
    docs = dict(C.iter_chapters(root, C.LINUX_DOC))
    assert set(docs) == {"admin", "net", "mm/*", "mm/*2"}  # mm (12k words) split into parts
    assert docs["admin"].startswith("Title admin/a.rst.txt") and "Title admin/b.rst.txt" in docs["admin"]
    assert not any("=====" in t for t in docs.values())  # reST adornments cleaned
    out = tmp_path / "out"
    assert main(["--source", "linux-doc", "--input", str(tmp_path / "pkg"), "--out", str(out),
                 "--tokenizer", "none", "--no-binarize", "--valid-frac", "0.25", "--test-frac", "0.25"]) == 0
    manifest = json.loads((out / "corpus.json").read_text())
    assert [manifest["splits"][s]["docs"] for s in C.SPLITS] == [2, 1, 1]
    assert manifest["config"]["source"] == "linux-doc"


def test_clean_rest_long_adornment_like_line_is_fast():
    line = "   " + "-" * 200 + " | " + "-" * 200  # not an adornment: kept, without backtracking
    assert C.text_to_lines(C.clean_rest(line)) == [line.strip()]
