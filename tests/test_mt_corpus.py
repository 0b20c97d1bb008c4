"""Tests of the translation corpus builder (trime_fairseq.prepare.mt, cli.prepare_mt)."""

import importlib.util
import itertools
import json
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict

import pytest

from trime_fairseq.cli.prepare_mt import main
from trime_fairseq.prepare import mt as M

HAS_FAIRSEQ = importlib.util.find_spec("fairseq_cli") is not None
ALL_SPLITS = M.SPLITS + M.INDOMAIN_SPLITS


def mo_bytes(entries: Dict[str, str]) -> bytes:
    """A GNU ``.mo`` file (little endian) for ``{msgid: msgstr}``; header entry added.

    Plural entries use ``"singular\\0plural"`` keys and ``"form0\\0form1"`` values,
    context entries ``"ctx\\x04msgid"`` keys, as msgfmt writes them.
    """
    entries = dict(entries)
    entries[""] = "Content-Type: text/plain; charset=UTF-8\nLanguage: de\n"
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    n = len(keys)
    start = 7 * 4 + 16 * n
    id_blob, str_blob, id_table, str_table = b"", b"", [], []
    for data in ids:
        id_table.append((len(data), start + len(id_blob)))
        id_blob += data + b"\0"
    for data in strs:
        str_table.append((len(data), start + len(id_blob) + len(str_blob)))
        str_blob += data + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    tables = b"".join(struct.pack("<2I", *t) for t in id_table + str_table)
    return header + tables + id_blob + str_blob


PO_HEADER = 'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=UTF-8\\n"\n"Language: de\\n"\n\n'


def po_entry(en: str, de: str, flags: str = "") -> str:
    return (f"#, {flags}\n" if flags else "") + f'msgid "{en}"\nmsgstr "{de}"\n\n'


WEBAPP = [(f"Delete the selected item number {i}", f"Das ausgewählte Element Nummer {i} löschen")
          for i in range(12)]
SHOP = [(f"Add product number {i} to the basket", f"Produkt Nummer {i} in den Warenkorb legen")
        for i in range(12)]
GENEALOGY = [(f"Edit the family tree of person {i}", f"Den Stammbaum von Person {i} bearbeiten")
             for i in range(8)]


def write_catalogs(root: Path) -> Path:
    """Three domains: webapp (.po), shop (.mo), genealogy (.po, to be held out)."""
    web = root / "webapp" / "de" / "LC_MESSAGES"
    web.mkdir(parents=True)
    po = PO_HEADER + "".join(po_entry(en, de) for en, de in WEBAPP)
    po += po_entry("This fuzzy entry is dropped", "Dieser unscharfe Eintrag fehlt", "fuzzy, python-format")
    po += po_entry("This entry has no translation", "")
    po += ('msgid "One apple was eaten today"\nmsgid_plural "%d apples were eaten today"\n'
           'msgstr[0] "Ein Apfel wurde heute gegessen"\nmsgstr[1] "%d Äpfel wurden heute gegessen"\n\n')
    po += po_entry("Save file", "Datei speichern")  # too short
    po += po_entry("_Open the recent project", "Das letzte Projekt ö_ffnen")  # accelerators
    po += po_entry("Welcome to the <b>new</b> site &amp; shop", "Willkommen auf der <b>neuen</b> Seite &amp; Laden")
    po += po_entry("Delete role %(name)s now", "Rolle %(name)s jetzt löschen")  # 3 words + placeholder
    po += po_entry("Delete %(name)s now", "%(name)s jetzt löschen")  # 2 words: dropped
    po += ('msgid ""\n"A long message that "\n"continues \\"quoted\\" here"\n'
           'msgstr ""\n"Eine lange Nachricht, die "\n"\\"zitiert\\" weitergeht"\n\n')
    po += '#~ msgid "An obsolete message is skipped"\n#~ msgstr "Eine veraltete Nachricht fehlt"\n\n'
    po += po_entry("The same words on both sides", "The same words on both sides")  # untranslated
    (web / "django.po").write_text(po, encoding="utf-8")

    shop = root / "shop" / "de" / "LC_MESSAGES"
    shop.mkdir(parents=True)
    mo = dict(SHOP)
    mo[WEBAPP[0][0]] = WEBAPP[0][1]  # exact duplicate pair of another catalog
    mo[WEBAPP[1][0] + "."] = "Eine andere Übersetzung desselben Satzes"  # same normalised English
    mo["One pear is ripe\0Many pears are ripe"] = "Eine Birne ist reif\0Viele Birnen sind reif"
    mo["menu\x04Close the main window"] = "Das Hauptfenster schließen"
    (shop / "shop.mo").write_bytes(mo_bytes(mo))
    fr = root / "shop" / "fr" / "LC_MESSAGES"
    fr.mkdir(parents=True)
    (fr / "shop.po").write_text(PO_HEADER + po_entry("A French catalog is ignored", "Un catalogue"))

    gen = root / "genealogy"
    gen.mkdir()
    po = PO_HEADER + "".join(po_entry(en, de) for en, de in GENEALOGY)
    po += po_entry(WEBAPP[2][0], "Eine Genealogie-Übersetzung")  # English shared with webapp
    (gen / "gramps.po").write_text(po, encoding="utf-8")
    return root


# Duplicates are resolved in (domain, text) order: shop's "... number 1." wins over webapp's.
EXPECTED_GENERAL_EN = (
    ({en for en, _ in WEBAPP} - {WEBAPP[1][0]}) | {WEBAPP[1][0] + "."} | {en for en, _ in SHOP}
    | {"Open the recent project", "Welcome to the new site & shop", "Delete role %(name)s now",
       'A long message that continues "quoted" here', "Close the main window"}
)
EXPECTED_HELDOUT_EN = {en for en, _ in GENEALOGY}


def read_lines(path: Path):
    return path.read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------- parsing


def test_parse_po_flags_plural_context_default_and_escapes():
    po = (PO_HEADER
          + '#. Default: "Events in the next 7 days."\nmsgid "7days_events"\nmsgstr "Termine der nächsten 7 Tage"\n\n'
          + '#, fuzzy\nmsgid "Fuzzy one"\nmsgstr "Unscharf"\n'  # no blank line before the next entry
          + 'msgctxt "menu"\nmsgid "Quit"\nmsgstr "Beenden"\n\n'
          + 'msgid "a"\nmsgid_plural "b"\nmsgstr[0] "x"\nmsgstr[1] "y"\n\n'
          + 'msgid "Tab\\there"\nmsgstr ""\n"Zeile\\n"\n"zwei"\n\n'
          + '#~ msgid "old"\n#~ msgstr "alt"\n')
    catalog = M.parse_po(po.encode())
    assert catalog.language == "de"
    got = [(m.msgid, m.msgstr, m.context, m.fuzzy, m.plural, m.default) for m in catalog.messages]
    assert got == [
        ("7days_events", "Termine der nächsten 7 Tage", None, False, False, "Events in the next 7 days."),
        ("Fuzzy one", "Unscharf", None, True, False, None),
        ("Quit", "Beenden", "menu", False, False, None),
        ("a", "x", None, False, True, None),
        ("Tab\there", "Zeile\nzwei", None, False, False, None),
    ]
    assert M.message_text(catalog.messages[0]) == ("Events in the next 7 days.", "Termine der nächsten 7 Tage")
    assert M.message_text(catalog.messages[1]) == (None, "fuzzy")
    assert M.message_text(catalog.messages[3]) == (None, "plural")


def test_parse_po_latin1_charset():
    po = 'msgid ""\nmsgstr "Content-Type: text/plain; charset=ISO-8859-1\\n"\n\nmsgid "Open"\nmsgstr "Öffnen"\n'
    assert [m.msgstr for m in M.parse_po(po.encode("latin-1")).messages] == ["Öffnen"]


def test_parse_mo_plural_and_context():
    data = mo_bytes({"Close it now": "Jetzt schließen", "ctx\x04Open it": "Öffnen",
                     "one file\0%d files": "eine Datei\0%d Dateien"})
    catalog = M.parse_mo(data)
    got = sorted((m.msgid, m.msgstr, m.context, m.plural) for m in catalog.messages)
    assert got == [("Close it now", "Jetzt schließen", None, False), ("Open it", "Öffnen", "ctx", False),
                   ("one file", "eine Datei", None, True)]
    assert catalog.language == "de"
    assert M.read_catalog("broken.mo", b"not a mo file") is None


def test_catalog_paths():
    assert M.is_german_catalog_path("pkg/locale/de/LC_MESSAGES/django.po", True)
    assert M.is_german_catalog_path("pkg/locale/de_DE/LC_MESSAGES/x.mo", True)
    assert not M.is_german_catalog_path("pkg/locale/de_AT/LC_MESSAGES/x.mo", True)
    assert not M.is_german_catalog_path("pkg/locale/fr/LC_MESSAGES/x.po", False)
    assert not M.is_german_catalog_path("gramps.po", True)
    assert M.is_german_catalog_path("gramps.po", False)
    assert not M.is_german_catalog_path("de/LC_MESSAGES/x.txt", False)
    assert M.prefer_po(["a/x.mo", "a/x.po", "a/y.mo"]) == ["a/x.po", "a/y.mo"]


# --------------------------------------------------------------------------- cleaning


def test_clean_text_and_word_count():
    assert M.clean_text("_Open &File now") == "Open File now"
    assert M.clean_text("Tom & Jerry &amp; <b>bold</b> text<br/>next &notice") == "Tom & Jerry & bold text next notice"
    assert M.clean_text("<No Status>  and\n%(user_name)s {x_y} ${z}") == "<No Status> and %(user_name)s {x_y} ${z}"
    assert M.count_words("Delete %(name)s now?") == 2
    assert M.count_words("Delete role %(name)s {x} now") == 3
    assert M.strip_inner_accelerator("Maximaler Altersunterschie_d hier", "Maximum age difference") == \
        "Maximaler Altersunterschied hier"
    assert M.strip_inner_accelerator("Use start_date here", "Nutze start_date") == "Use start_date here"


def test_clean_pair_filters():
    f = M.Filters(min_words=3, max_words=6, max_len_ratio=2.0)
    assert M.clean_pair("Open the file", "Datei öffnen jetzt", f) == (("Open the file", "Datei öffnen jetzt"), "kept")
    assert M.clean_pair("Open file", "Datei öffnen", f)[1] == "too_short"
    assert M.clean_pair("one two three four five six seven", "eins zwei drei", f)[1] == "too_long"
    assert M.clean_pair("one two three four five six", "eins zwei drei", f)[1] == "kept"
    assert M.clean_pair("one two three four five six", "eins zwei drei", M.Filters(3, 6, 1.5))[1] == "length_ratio"
    assert M.clean_pair("Same three words", "same three words!", f)[1] == "untranslated"


def test_deduplicate_prefers_general_and_removes_shared_sides():
    P = M.SentencePair
    pairs = [
        P("folder", "b", "Eins zwei drei", "One two three"),
        P("folder", "a", "Eins zwei drei", "One two three"),  # exact duplicate (other domain)
        P("folder", "a", "Andere Übersetzung", "one, two three!"),  # same normalised English
        P("folder", "a", "eins zwei DREI.", "The different English here"),  # same normalised German
        P("folder", "held", "Vier fünf sechs", "Four five six"),
        P("folder", "c", "Vier fünf sechs!", "Four five six seven"),  # general wins over held
    ]
    kept, dropped = M.deduplicate(list(reversed(pairs)), heldout=("held",))
    assert sorted((p.domain, p.en) for p in kept) == [("a", "One two three"), ("c", "Four five six seven")]
    assert dropped == {"duplicate_pair": 1, "duplicate_en": 1, "duplicate_de": 2}


def test_split_pairs_is_seeded_and_checks_size():
    pairs = [M.SentencePair("s", "d", f"de {i}", f"en {i}") for i in range(10)]
    a = M.split_pairs(pairs, 2, 3, seed=1)
    assert [len(a[s]) for s in M.SPLITS] == [5, 2, 3]
    assert a == M.split_pairs(pairs, 2, 3, seed=1)
    assert sorted(p.en for s in M.SPLITS for p in a[s]) == sorted(p.en for p in pairs)
    with pytest.raises(M.CorpusError, match="too few pairs"):
        M.split_pairs(pairs, 5, 5, seed=1)


# --------------------------------------------------------------------------- sources


def test_wheel_source_reads_german_catalogs_from_cache_without_network(tmp_path, monkeypatch):
    cache = tmp_path / "wheels"
    cache.mkdir()
    spec = M.WheelCatalogs("my.App", "1.0")
    with zipfile.ZipFile(cache / "my_app-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("app/locale/de/LC_MESSAGES/django.po", PO_HEADER + po_entry("Open the file now", "Datei jetzt öffnen"))
        zf.writestr("app/locale/de/LC_MESSAGES/django.mo", mo_bytes({"Ignored because po exists": "Egal hier"}))
        zf.writestr("app/locale/de_AT/LC_MESSAGES/django.po", PO_HEADER + po_entry("Austrian text here", "Jänner ist hier"))
        zf.writestr("app/locale/fr/LC_MESSAGES/django.po", PO_HEADER + po_entry("French text here", "Texte ici"))

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(M.subprocess, "run", no_network)
    wheels, failed = M.ensure_wheels([spec], cache)
    assert failed == [] and wheels["my.App"].name == "my_app-1.0-py3-none-any.whl"
    collector = M.PairCollector(M.Filters())
    assert M.collect_wheel(wheels["my.App"], "my.App", collector) == 1
    assert [(p.domain, p.en, p.de) for p in collector.pairs] == [("my.App", "Open the file now", "Datei jetzt öffnen")]


def test_ddtp_pairs_by_package_and_md5():
    en = ("Package: foo\nDescription-md5: aaa\nDescription-en: frobnicate the widgets quickly\n"
          " Foo frobnicates all the widgets.\n .\n Features:\n  * fast widget handling\n  * small memory use\n\n"
          "Package: bar\nDescription-md5: bbb\nDescription-en: bar tool for text\n One paragraph.\n .\n Two.\n\n"
          "Package: old\nDescription-md5: ccc\nDescription-en: old english text\n")
    de = ("Package: foo\nDescription-md5: aaa\nDescription-de: die Widgets schnell frobnizieren\n"
          " Foo frobniziert alle Widgets.\n .\n Funktionen:\n  * schnelle Widget-Behandlung\n  * wenig Speicher\n\n"
          "Package: bar\nDescription-md5: bbb\nDescription-de: Bar-Werkzeug für Text\n Ein einziger Absatz.\n\n"
          "Package: old\nDescription-md5: zzz\nDescription-de: veralteter Text\n")
    got = list(M.iter_ddtp(en, de))
    assert got == [
        ("foo", "frobnicate the widgets quickly", "die Widgets schnell frobnizieren"),
        ("foo", "Foo frobnicates all the widgets.", "Foo frobniziert alle Widgets."),
        ("foo", "Features:", "Funktionen:"),
        ("foo", "fast widget handling", "schnelle Widget-Behandlung"),
        ("foo", "small memory use", "wenig Speicher"),
        ("bar", "bar tool for text", "Bar-Werkzeug für Text"),  # paragraph counts differ: short only
    ]


# --------------------------------------------------------------------------- end to end


def base_argv(folder: Path, out: Path):
    return ["--folder", str(folder), "--out", str(out), "--tokenizer", "none", "--workers", "1",
            "--heldout-domain", "genealogy", "--valid-size", "3", "--test-size", "3",
            "--indomain-valid-size", "2", "--indomain-test-size", "2"]


@pytest.mark.skipif(not HAS_FAIRSEQ, reason="fairseq is not importable")
def test_cli_folder_end_to_end_heldout_binarized_and_rerun(tmp_path):
    from fairseq.data import Dictionary, data_utils

    folder = write_catalogs(tmp_path / "catalogs")
    out = tmp_path / "out"
    argv = base_argv(folder, out)
    assert main(argv) == 0
    manifest = json.loads((out / "corpus.json").read_text())

    raw = {s: (read_lines(out / "raw" / f"{s}.en"), read_lines(out / "raw" / f"{s}.de"),
               read_lines(out / "raw" / f"{s}.domain")) for s in ALL_SPLITS}
    general_en = [en for s in M.SPLITS for en in raw[s][0]]
    heldout_en = [en for s in M.INDOMAIN_SPLITS for en in raw[s][0]]
    assert sorted(general_en) == sorted(EXPECTED_GENERAL_EN)  # drops, cleaning, dedupe
    assert sorted(heldout_en) == sorted(EXPECTED_HELDOUT_EN)
    all_de = {de for s in ALL_SPLITS for de in raw[s][1]}
    assert "Das letzte Projekt öffnen" in all_de and "Willkommen auf der neuen Seite & Laden" in all_de
    assert {d for s in M.SPLITS for d in raw[s][2]} == {"webapp", "shop"}
    assert {d for s in M.INDOMAIN_SPLITS for d in raw[s][2]} == {"genealogy"}
    assert [len(raw[s][0]) for s in ALL_SPLITS] == [len(EXPECTED_GENERAL_EN) - 6, 3, 3, 4, 2, 2]
    # no pair, English or German sentence shared between two splits
    for a, b in itertools.combinations(ALL_SPLITS, 2):
        for side in (0, 1):
            keys_a = {M.normalize_key(x) for x in raw[a][side]}
            assert not keys_a & {M.normalize_key(x) for x in raw[b][side]}, (a, b)

    d = Dictionary.load(str(out / "bin" / "dict.de.txt"))
    assert (out / "bin" / "dict.de.txt").read_text() == (out / "bin" / "dict.en.txt").read_text()
    for split in ALL_SPLITS:
        for lang, side in (("de", 1), ("en", 0)):
            text = read_lines(out / f"{split}.{lang}")
            assert text == raw[split][side]  # --tokenizer none: whitespace tokens
            ds = data_utils.load_indexed_dataset(str(out / "bin" / f"{split}.de-en.{lang}"), d)
            assert ds is not None and len(ds) == len(text)
            assert list(ds.sizes) == [len(line.split()) + 1 for line in text]
            # every split is encoded with the one joined dictionary (unknown words -> <unk>)
            expected = [" ".join(w if d.index(w) != d.unk() else d.unk_word for w in line.split())
                        for line in text]
            assert [d.string(ds[i]) for i in range(len(ds))] == expected
    assert manifest["splits"]["indomain_test"]["pairs"] == 2
    assert manifest["heldout"]["domains"] == ["genealogy"]
    assert manifest["per_domain"]["genealogy"]["heldout"] is True
    assert manifest["per_domain"]["shop"]["kept"] == 15
    assert manifest["pairs"]["dropped"]["fuzzy"] == 1 and manifest["pairs"]["dropped"]["plural"] == 2

    stamp = (out / "corpus.json").stat().st_mtime_ns
    assert main(argv) == 0  # complete output, same settings: no-op
    assert (out / "corpus.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit, match="different settings"):
        main(argv + ["--seed", "7"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalogs", "out"]


def test_cli_sentencepiece_text_only_detokenises(tmp_path):
    import sentencepiece as spm

    folder = write_catalogs(tmp_path / "catalogs")
    out = tmp_path / "out"
    argv = base_argv(folder, out)
    argv[argv.index("--tokenizer") + 1] = "sentencepiece"
    assert main(argv + ["--no-binarize", "--vocab-size", "60"]) == 0
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["files"]["spm_model"] == "spm.model" and not (out / "bin").exists()
    assert not (out / "spm.train.raw").exists()
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    for split in ALL_SPLITS:
        pieces = read_lines(out / f"{split}.en")
        assert all("\u2581" in line for line in pieces)
        assert [sp.decode_pieces(line.split()) for line in pieces] == read_lines(out / "raw" / f"{split}.en")


def test_folder_without_heldout_and_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    folder = write_catalogs(tmp_path / "catalogs")
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "write_tokenized_split", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["--folder", str(folder), "--out", str(out), "--tokenizer", "none", "--no-binarize",
              "--valid-size", "2", "--test-size", "2"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalogs"]
    monkeypatch.undo()
    main(["--folder", str(folder), "--out", str(out), "--tokenizer", "none", "--no-binarize",
          "--valid-size", "2", "--test-size", "2"])
    manifest = json.loads((out / "corpus.json").read_text())
    assert manifest["heldout"] is None and list(manifest["splits"]) == list(M.SPLITS)
    assert sum(manifest["splits"][s]["pairs"] for s in M.SPLITS) == len(EXPECTED_GENERAL_EN) + len(GENEALOGY)


def test_module_is_runnable_with_help():
    proc = subprocess.run([sys.executable, "-m", "trime_fairseq.cli.prepare_mt", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--heldout-domain" in proc.stdout and "prepare-iwslt14.sh" in proc.stdout


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "extra, flag, expected",
    [
        (["--valid-size", "-1"], "--valid-size", "must be >= 1"),
        (["--sources", "folder,bogus"], "--sources", "unknown source 'bogus'"),
        (["--sources", "pypi"], "--folder", "only used with --sources folder"),
        (["--heldout-domain", "nosuch"], "--heldout-domain", "matches no domain"),
        (["--valid-size", "40"], "--valid-size", "too few pairs"),
        (["--indomain-test-size", "30"], "--indomain-test-size", "too few pairs"),
        (["--max-words", "2"], "--max-words", "must be >= --min-words"),
    ],
)
def test_bad_flags_give_one_line_errors(tmp_path, extra, flag, expected):
    folder = write_catalogs(tmp_path / "catalogs")
    out = tmp_path / "out"
    argv = ["--folder", str(folder), "--out", str(out), "--tokenizer", "none", "--no-binarize",
            "--valid-size", "2", "--test-size", "2"]
    if "--heldout-domain" not in extra and "--indomain-test-size" in extra:
        extra = extra + ["--heldout-domain", "genealogy"]
    with pytest.raises(SystemExit) as excinfo:
        main(argv + extra)
    assert excinfo.value.code == 2
    message = str(excinfo.value)
    assert message.startswith("prepare_mt: error: ") and "\n" not in message
    assert flag in message and expected in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["catalogs"]


def test_missing_folder_and_incomplete_out(tmp_path):
    with pytest.raises(SystemExit, match="--folder .* is not a directory"):
        main(["--folder", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--folder DIR is required"):
        main(["--sources", "folder", "--out", str(tmp_path / "out")])
    folder = write_catalogs(tmp_path / "catalogs")
    half = tmp_path / "half"
    half.mkdir()
    (half / "train.de").write_text("partial\n")
    with pytest.raises(SystemExit, match="not a complete corpus"):
        main(["--folder", str(folder), "--out", str(half), "--tokenizer", "none", "--no-binarize"])
