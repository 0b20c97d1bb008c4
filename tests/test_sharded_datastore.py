"""Sharded datastore builds: N shards + merge == one single-worker build."""
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli
from trime_fairseq.cli import build_datastore as bd
from trime_fairseq.memory.datastore import Datastore, DatastoreError, DatastoreMeta, DatastoreWriter
from trime_fairseq.memory.search_index import SearchIndex
from trime_fairseq.memory.shards import merge_datastores, merged_meta, shard_meta, shard_path, shard_range

EV = ["--tokens-per-sample", "64", "--context-window", "32", "--cpu", "--max-tokens", "192"]  # 2 blocks a batch


def args(data, ckpt, out, *extra):
    return [str(data), "--path", str(ckpt), "--gen-subset", "train", "--out", str(out), "--key-dtype", "float32",
            "--recall-k", "8", "--recall-queries", "50", *EV, *extra]


@pytest.fixture(scope="module")
def single(tiny_lm, tmp_path_factory):
    data, ckpt, _ = tiny_lm
    out = tmp_path_factory.mktemp("single") / "train"
    bd.main(args(data, ckpt, out))
    return data, ckpt, out


def assert_same_datastore(a: Path, b: Path) -> None:
    """keys, values and meta byte for byte; index settings (but timing) and search results equal."""
    for name in ("keys.npy", "values.npy", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ia, ib = (json.loads((d / "index.json").read_text()) for d in (a, b))
    ia.pop("build_seconds"), ib.pop("build_seconds")
    assert ia == ib
    xa, xb = SearchIndex.load(str(a)), SearchIndex.load(str(b))
    q = np.random.default_rng(0).standard_normal((20, Datastore(str(a)).meta.dim)).astype(np.float32)
    da, ida = xa.search(q, 8)
    db, idb = xb.search(q, 8)
    np.testing.assert_array_equal(ida, idb)
    np.testing.assert_array_equal(da, db)


def test_two_shards_and_merge_equal_the_single_build(single, tmp_path):
    data, ckpt, ref = single
    out = tmp_path / "train"
    for i in (1, 0):  # any order, any process
        bd.main(args(data, ckpt, out, "--num-shards", "2", "--shard-id", str(i)))
        assert not (Path(shard_path(out, i)) / "index.faiss").exists()
    sizes = [len(Datastore(shard_path(out, i))) for i in range(2)]
    assert min(sizes) > 0 and sum(sizes) == len(Datastore(str(ref)))
    bd.main(args(data, ckpt, out, "--merge-shards", "2"))
    assert_same_datastore(ref, out)
    assert not Path(shard_path(out, 0)).exists()  # merged shards are removed (--keep-shards keeps them)


def test_local_worker_processes_build_merge_and_index(single, tmp_path):
    data, ckpt, ref = single
    out = tmp_path / "train"
    proc = run_cli(["trime_fairseq.cli.build_datastore", *args(data, ckpt, out, "--num-shards", "3", "--workers", "2",
                                                             "--keep-shards")])
    assert_same_datastore(ref, out)
    assert all(Path(shard_path(out, i)).is_dir() for i in range(3))
    assert "merged 3 shards" in proc.stderr


def test_killed_shard_resumes_and_incomplete_shards_are_refused(single, tmp_path, monkeypatch, capsys):
    data, ckpt, ref = single
    out = tmp_path / "train"
    bd.main(args(data, ckpt, out, "--num-shards", "2", "--shard-id", "0"))
    calls = {"n": 0}
    original = DatastoreWriter.write

    def dying_write(self, keys, values):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(self, keys, values)

    monkeypatch.setattr(DatastoreWriter, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        bd.main(args(data, ckpt, out, "--num-shards", "2", "--shard-id", "1"))
    monkeypatch.setattr(DatastoreWriter, "write", original)
    progress = json.loads((Path(shard_path(out, 1) + ".partial") / "progress.json").read_text())
    assert progress["written"] > 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        bd.main(args(data, ckpt, out, "--merge-shards", "2"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--merge-shards: shard 1" in err and "unfinished" in err and "--shard-id 1" in err
    assert not out.exists()
    resumed = {"first": None}

    def recording_write(self, keys, values):
        resumed["first"] = resumed["first"] if resumed["first"] is not None else self.written
        return original(self, keys, values)

    monkeypatch.setattr(DatastoreWriter, "write", recording_write)
    bd.main(args(data, ckpt, out, "--num-shards", "2", "--shard-id", "1"))
    assert resumed["first"] == progress["written"]  # picked up where it stopped
    monkeypatch.setattr(DatastoreWriter, "write", original)
    bd.main(args(data, ckpt, out, "--merge-shards", "2"))
    assert_same_datastore(ref, out)


MT = ["--task", "trime_translation", "--batch-size", "3", "--key-dtype", "float32", "--recall-k", "8",
      "--recall-queries", "50", "--cpu"]


def test_two_translation_shards_equal_the_single_build(tiny_mt, tmp_path):
    from conftest import USER_DIR

    data, ckpt, _ = tiny_mt

    def mt(out, *extra):
        bd.main([str(data), "--user-dir", USER_DIR, "--path", str(ckpt), "--gen-subset", "train", "--out", str(out),
                 *MT, *extra])

    ref, out = tmp_path / "single", tmp_path / "sharded"
    mt(ref)
    for i in (1, 0):
        mt(out, "--num-shards", "2", "--shard-id", str(i))
    sizes = [len(Datastore(shard_path(out, i))) for i in range(2)]
    assert min(sizes) > 0 and sum(sizes) == len(Datastore(str(ref)))
    assert Datastore(shard_path(out, 0)).meta.source["shard"]["end"] == sizes[0]
    mt(out, "--merge-shards", "2")
    assert_same_datastore(ref, out)


def _meta(size, **source):
    return DatastoreMeta(size=size, dim=4, key_dtype="float32", value_dtype="int32", key_type="ffn_input",
                         model_sha256="m", dictionary_sha256="d", vocab_size=10, source={"split": "train", **source})


def test_shard_ranges_tile_the_split_on_batch_boundaries():
    n_keys, block, batch = 1000, 64, 3  # 16 blocks (the last one short), 6 batches
    ends = np.minimum(np.arange(1, 17) * block, n_keys)
    ranges = [shard_range(ends, batch, 4, i) for i in range(4)]
    assert ranges[0].start_key == 0 and ranges[-1].end_key == n_keys
    for a, b in zip(ranges, ranges[1:]):
        assert a.end_key == b.start_key and a.end_unit == b.start_unit and a.end_unit % batch == 0
        assert a.end_key == ends[a.end_unit - 1]
    with pytest.raises(DatastoreError, match="--num-shards 7"):
        shard_range(ends, batch, 7, 0)
    with pytest.raises(DatastoreError, match="--shard-id"):
        shard_range(ends, batch, 4, 4)


def test_shard_ranges_of_uneven_units():
    ends = np.cumsum([5, 3, 7, 1, 4])  # e.g. MT target sentences
    ranges = [shard_range(ends, 2, 2, i) for i in range(2)]
    assert [(r.start_unit, r.end_unit, r.start_key, r.end_key) for r in ranges] == [(0, 4, 0, 16), (4, 5, 16, 20)]


def test_merge_refuses_shards_that_do_not_belong_together(tmp_path):
    whole = _meta(10)
    metas = [shard_meta(whole, shard_range(np.arange(1, 11), 1, 2, i)) for i in range(2)]
    assert merged_meta(metas, ["a", "b"]) == whole
    other_model = DatastoreMeta(**{**metas[1].__dict__, "model_sha256": "x"})
    with pytest.raises(DatastoreError, match="shard 1 .* differs from shard 0 in model_sha256"):
        merged_meta([metas[0], other_model], ["a", "b"])
    with pytest.raises(DatastoreError, match="expected shard 0 of 2"):
        merged_meta([metas[1], metas[0]], ["b", "a"])
    other_data = DatastoreMeta(**{**metas[1].__dict__, "source": {**metas[1].source, "split": "valid"}})
    with pytest.raises(DatastoreError, match="other data or settings"):
        merged_meta([metas[0], other_data], ["a", "b"])
    with pytest.raises(DatastoreError, match="not a shard"):
        merged_meta([whole, metas[1]], ["a", "b"])
    with pytest.raises(DatastoreError, match="shard 0 .* is missing"):
        merge_datastores([tmp_path / "nope0", tmp_path / "nope1"], str(tmp_path / "out"))
