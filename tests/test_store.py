"""Training from token stores: the same rows and fields as the equivalent 2-D .npy tokens file,
the (seed, step) order and resume, each host reading only its rows (two real processes), reads
made ahead, damaged shards and refused manifests, gs:// through a GCS API emulator with 30 ms
per request, and weighted mixtures of stores."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import jax
import numpy as np
import processes
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.data import mixture, pipeline, prepare, store
from llama_jax.data.pipeline import FIELDS, DataConfig, DataIterator
from llama_jax.data.prefetch import Prefetcher
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError
from llama_jax.sharding import create_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "configs", "data")
BATCH_SPEC = PartitionSpec(("dcn", "data", "fsdp"))
T = 32


def single():
    return NamedSharding(create_mesh(devices=jax.devices()[:1]), BATCH_SPEC)


def make_docs(n, seed):
    with open(os.path.join(TOKENIZER_DIR, "tiny_corpus.txt")) as f:
        words = sorted({w.strip(".,") for w in f.read().split()} - {""})
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.0, 0.8, size=n).astype(int), 1, 80)
    return [" ".join(rng.choice(words, size=k)) for k in lengths]


def make_store(directory, tok, docs, **kw):
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = directory / "store"
    kw.setdefault("rows_per_shard", 7)
    prepare.prepare_store([str(src)], tok, str(out), seq_len=T, **kw)
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok):
    """A store and the same rows as a 2-D tokens file with its segments file."""
    root = tmp_path_factory.mktemp("stores")
    out = make_store(root / "a", tok, make_docs(300, seed=0))
    tokens, segment_ids = store.TokenStore(str(out)).read(np.arange(_rows(out)))
    np.save(root / "rows.npy", tokens.astype(np.uint16))
    np.save(root / "rows.segments.npy", segment_ids.astype(np.uint16))
    return out, root / "rows.npy"


def _rows(out):
    return json.loads((out / "manifest.json").read_text())["rows"]


def config(path, **kw):
    kw.setdefault("seq_len", T)
    kw.setdefault("global_batch", 8)
    kw.setdefault("format", "store")
    return DataConfig(path=os.fspath(path), **kw)


def write_tiny_model_dir(directory, model, tokenizer_file=None):
    """`model` as a converted model directory with a tokenizer.json (the bundled one)."""
    from flax import nnx

    from llama_jax import formats

    formats.write_model_dir(
        directory,
        model.config,
        formats.handed_out(nnx.to_pure_dict(nnx.state(model))),
        metadata={},
        files={"tokenizer.json": tokenizer_file or os.path.join(TOKENIZER_DIR, "tokenizer.json")},
    )


def rows_of(batches, count):
    """The first `count` rows of consecutive batches: each a tuple of its fields' bytes."""
    out = []
    for batch in batches:
        for i in range(len(batch["tokens"])):
            out.append(tuple(np.asarray(batch[f][i]).tobytes() for f in FIELDS))
    return out[:count]


# ---- the rows and their order -----------------------------------------------------------------


def test_store_gives_the_rows_of_the_equivalent_tokens_file(built):
    out, npy = built
    r = _rows(out)
    it = DataIterator(config(out), None, single())
    ref = DataIterator(config(npy, format="tokens"), None, single())
    assert it.num_rows == ref.num_rows == r
    steps = -(-r // 8)
    batches = [it.local_batch(k) for k in range(steps)]
    # One epoch visits every row once, with the same fields the tokens file gives.
    got = rows_of(batches, r)
    assert sorted(got) == sorted(rows_of([ref.local_batch(k) for k in range(steps)], r))
    assert len(set(got)) == r
    for batch in batches:
        for name in FIELDS:
            assert batch[name].dtype == np.int32 and batch[name].shape == (8, T)
    # The next epoch is another order of the same rows; batches run across the boundary.
    positions = rows_of([it.local_batch(k) for k in range(2 * steps + 1)], 2 * r)
    assert sorted(positions[r:]) == sorted(positions[:r]) and positions[r:] != positions[:r]
    it.close()


def test_order_is_a_function_of_seed_and_step(built):
    out, _ = built
    a, b, c = (DataIterator(config(out, seed=s), None, single()) for s in (5, 5, 6))
    run = [{k: np.asarray(v) for k, v in next(a).items()} for _ in range(6)]
    for k in range(6):
        batch = next(b)
        for name in FIELDS:
            np.testing.assert_array_equal(np.asarray(batch[name]), run[k][name])
    assert not np.array_equal(next(c)["tokens"], run[0]["tokens"])
    resumed = DataIterator(config(out, seed=5), None, single())
    resumed.restore(json.loads(json.dumps({"step": 4})))
    assert resumed.state() == {"step": 4}
    np.testing.assert_array_equal(np.asarray(next(resumed)["tokens"]), run[4]["tokens"])
    for it in (a, b, c, resumed):
        it.close()


def test_a_store_directory_is_detected_and_checked(built, tok, tmp_path):
    out, _ = built
    assert DataConfig(path=str(out), format="text", seq_len=T, global_batch=8).format == "store"
    it = DataIterator(config(out), tok, single(), vocab_size=300)
    assert it.num_rows == _rows(out)
    with pytest.raises(DataError, match=rf"holds rows of {T} tokens; expected seq_len=64"):
        DataIterator(config(out, seq_len=64), None, single())
    with pytest.raises(DataError, match=r"vocabulary of 256 ids; the model has 200"):
        DataIterator(config(out), None, single(), vocab_size=200)
    with pytest.raises(DataError, match=r"makes \d+ rows of seq_len=32; global_batch=4096 needs"):
        DataIterator(config(out, global_batch=4096), None, single())
    # The same tokenizer written out again: other bytes, so another fingerprint.
    other = tmp_path / "tokenizer.json"
    with open(tok.path) as f:
        other.write_text(json.dumps(json.load(f), indent=1))
    with pytest.raises(DataError, match=r"was made with another tokenizer"):
        DataIterator(config(out), Tokenizer.from_file(other), single())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is not a token store: it has no manifest.json"):
        DataIterator(config(tmp_path / "empty"), None, single())


def test_a_directory_without_a_manifest_is_named_for_what_it_is(built, tmp_path):
    """An unfinished store (shards, no manifest: prepare_data was stopped) and a plain
    directory, given as training or evaluation data, are refused as such."""
    from llama_jax import evals

    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(built[0] / "shard-00000.npy", half)
    plain = tmp_path / "plain"
    plain.mkdir()
    for directory, match in ((half, "is an unfinished token store"), (plain, "is a directory")):
        for fmt in ("text", "tokens"):
            with pytest.raises(DataError, match=match):
                DataIterator(config(directory, format=fmt), None, single(), vocab_size=300)
        with pytest.raises(DataError, match=match):
            evals.read_documents(str(directory), format="text")


def test_newer_manifest_is_refused(built, tmp_path):
    out, _ = built
    copy = tmp_path / "store"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"version": 2}))
    with pytest.raises(DataError, match=r"format version 2, newer than this reader's 1; update"):
        DataIterator(config(copy), None, single())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"format": "something"}))
    with pytest.raises(DataError, match=r"is not a token store manifest \(format 'something'\)"):
        DataIterator(config(copy), None, single())
    # Hand-edited entries of the wrong type are named, not met later as a traceback.
    bad_rows = [dict(manifest["shards"][0], rows=str(manifest["shards"][0]["rows"]))]
    for change, match in (
        ({"shards": bad_rows + manifest["shards"][1:]}, r"shards\[0\].rows is '\d+'; expected"),
        ({"seq_len": T + 0.5}, r"seq_len is 32.5; expected a non-negative int"),
        ({"vocab_size": True}, r"vocab_size is True; expected a non-negative int"),
    ):
        (copy / "manifest.json").write_text(json.dumps(manifest | change))
        with pytest.raises(DataError, match=r"malformed entry: " + match):
            DataIterator(config(copy), None, single())


def test_damaged_shard_fails_its_checksum_when_read(built, tmp_path):
    out, _ = built
    copy = tmp_path / "store"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = manifest["shards"][3]
    raw = bytearray((copy / shard["name"]).read_bytes())
    raw[shard["data_offset"] + manifest["row_bytes"] * 2 + 5] ^= 0x01  # row 2 of shard 3
    (copy / shard["name"]).write_bytes(bytes(raw))
    it = DataIterator(config(copy), None, single())
    damaged = 3 * manifest["rows_per_shard"] + 2
    with pytest.raises(DataError, match=rf"shard-00003.npy: checksum mismatch in row {damaged}"):
        for _ in range(2 * -(-_rows(out) // 8)):
            next(it)
    it.close()
    (copy / shard["name"]).write_bytes(bytes(raw[: shard["data_offset"] + 100]))
    with pytest.raises(DataError, match=r"shard-00003.npy is truncated"):
        store.TokenStore(str(copy)).read([damaged])


# ---- hosts and prefetch ------------------------------------------------------------------------


WORKER = textwrap.dedent(
    """
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    port, pid, path, out = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from llama_jax.data import DataConfig, DataIterator, store
    from llama_jax.sharding import MESH_AXES
    read = []
    original = store.TokenStore._read_range
    def recording(self, spec):
        shard, first, count, _ = spec
        start = shard * self.manifest.rows_per_shard + first
        read.extend(range(start, start + count))
        return original(self, spec)
    store.TokenStore._read_range = recording
    devices = jax.devices()
    mesh = Mesh(np.array(devices).reshape(1, 2, 4, 1), MESH_AXES)
    sharding = NamedSharding(mesh, PartitionSpec(("dcn", "data", "fsdp")))
    cfg = DataConfig(path=path, format="store", seq_len=32, global_batch=8, prefetch=0)
    it = DataIterator(cfg, None, sharding)
    result = {"read": [], "local": []}
    for k in range(3):
        read.clear()
        batch = next(it)
        result["read"].append(sorted(read))
        result["local"].append(it.local_batch(k)["tokens"].tolist())
        pieces = batch["tokens"].addressable_shards
        result.setdefault("shards", []).append(
            {p.index[0].start: np.asarray(p.data).tolist() for p in pieces}
        )
    with open(out, "w") as f:
        json.dump(result, f)
    """
)


def test_each_process_reads_only_its_rows(built, tmp_path):
    out, _ = built
    reference = DataIterator(config(out), None, single())
    whole = store.TokenStore(str(out))
    order = mixture.Mixture([whole], [1.0], 0, 8)
    port = processes.free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": REPO}
    processes.run_together(
        [
            [sys.executable, "-c", WORKER, str(port), str(pid), str(out), str(tmp_path / f"{pid}")]
            for pid in range(2)
        ],
        env=env,
        timeout=120,
    )
    for pid in range(2):
        result = json.loads((tmp_path / f"{pid}").read_text())
        mine = np.arange(4 * pid, 4 * pid + 4)
        for k in range(3):
            full = reference.local_batch(k)["tokens"]
            np.testing.assert_array_equal(result["local"][k], full[mine])
            # The rows this process read are exactly those of its own half of the batch.
            _, rows = order.locate(k, mine)
            assert result["read"][k] == sorted(rows.tolist())
            assert sorted(int(i) for i in result["shards"][k]) == mine.tolist()
            for i, data in result["shards"][k].items():
                np.testing.assert_array_equal(data, full[int(i) : int(i) + 1])
    reference.close()


def test_prefetcher_makes_the_next_batches_ahead():
    made, release = [], threading.Event()

    def make(step):
        made.append(step)
        if step == 6:
            raise DataError("step 6 is broken")
        if step >= 4:
            release.wait(10)
        return step * 10

    p = Prefetcher(make, depth=3)
    assert p.get(0) == 0
    # Steps 1-3 are made while step 0 is in use, before anyone asks for them.
    deadline = time.time() + 10
    while not {1, 2, 3} <= set(made) and time.time() < deadline:
        time.sleep(0.01)
    assert {1, 2, 3} <= set(made) and p.pending() == [1, 2, 3]
    assert p.get(1) == 10 and p.pending() == [2, 3, 4]
    release.set()
    assert p.get(3) == 30 and p.pending() == [4, 5, 6]
    # An error belongs to its step: raised when that step is asked for.
    assert p.get(5) == 50
    with pytest.raises(DataError, match="step 6 is broken"):
        p.get(6)
    p.close()
    assert Prefetcher(make, depth=0).get(2) == 20 and made[-1] == 2


def test_rows_adjacent_in_a_shard_are_one_read(built, monkeypatch):
    out, _ = built
    reads = []
    original = store.TokenStore._read_range

    def recording(self, spec):
        reads.append(spec[:3])
        return original(self, spec)

    monkeypatch.setattr(store.TokenStore, "_read_range", recording)
    token_store = store.TokenStore(str(out))
    tokens, _ = token_store.read([11, 3, 4, 5, 6, 7, 10, 4])
    # 7 rows a shard: records 3-6 of shard 0, record 0 of shard 1, records 3-4 of shard 1.
    assert sorted(reads) == [(0, 3, 4), (1, 0, 1), (1, 3, 2)]
    one_by_one = [original(token_store, (r // 7, r % 7, 1, 0))[0][0] for r in (11, 3, 4)]
    np.testing.assert_array_equal(tokens[:3], one_by_one)
    np.testing.assert_array_equal(tokens[7], tokens[2])


def test_iterator_reads_the_next_batches_while_one_is_used(built, monkeypatch):
    out, _ = built
    read = []
    original = store.TokenStore._read_range

    def recording(self, spec):
        shard, first, count, _ = spec
        start = shard * self.manifest.rows_per_shard + first
        read.extend(range(start, start + count))
        return original(self, spec)

    monkeypatch.setattr(store.TokenStore, "_read_range", recording)
    it = DataIterator(config(out, prefetch=2), None, single())
    order = mixture.Mixture([store.TokenStore(str(out))], [1.0], 0, 8)
    next(it)
    want = {int(r) for k in (1, 2) for r in order.locate(k, np.arange(8))[1]}
    deadline = time.time() + 10
    while not want <= set(read) and time.time() < deadline:
        time.sleep(0.01)
    assert want <= set(read)
    expected = store.TokenStore(str(out)).read(order.locate(1, np.arange(8))[1])[0]
    before = len(read)
    batch = next(it)  # step 1 was read ahead: taking it reads only step 3 ahead
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), expected)
    time.sleep(0.2)
    assert set(read[before:]) <= {int(r) for r in order.locate(3, np.arange(8))[1]}
    it.close()


def test_large_text_files_get_a_hint(tmp_path, tok, monkeypatch, caplog):
    path = tmp_path / "c.txt"
    path.write_text("a b c\n\nd e f\n" * 20)
    monkeypatch.setattr(pipeline, "_HINT_BYTES", 100)
    DataIterator(
        DataConfig(path=str(path), format="text", seq_len=8, global_batch=1), tok, single()
    )
    hints = [r.getMessage() for r in caplog.records if "prepare_data" in r.getMessage()]
    assert len(hints) == 1 and "c.txt is 0 MB of text that every host reads" in hints[0]


# ---- gs:// --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs(built):
    from gcs import Emulator

    with Emulator(latency_ms=30) as emulator:
        emulator.upload(str(built[0]), "bucket/store")
        yield emulator


def test_gcs_store_reads_the_same_batches(built, gcs):
    out, _ = built
    remote = DataIterator(config("gs://bucket/store", global_batch=64), None, single())
    local = DataIterator(config(out, global_batch=64), None, single())
    gcs.reset_stats()
    for k in range(3):
        a, b = remote.local_batch(k), local.local_batch(k)
        for name in FIELDS:
            np.testing.assert_array_equal(a[name], b[name])
    # 64 scattered rows a batch are read as concurrent range requests.
    assert gcs.stats()["max_in_flight"] >= 16
    remote.close(), local.close()


def test_prefetch_hides_the_request_latency(gcs):
    waits = {}
    for depth in (0, 2):
        it = DataIterator(config("gs://bucket/store", prefetch=depth), None, single())
        next(it)
        times = []
        for _ in range(5):
            time.sleep(0.2)  # the step's compute
            start = time.perf_counter()
            next(it)
            times.append(time.perf_counter() - start)
        waits[depth] = statistics.median(times)
        it.close()
    # Without prefetch every batch waits for at least one 30 ms round of requests; with it the
    # batch was read during the previous step.
    assert waits[0] >= 0.03 and waits[2] < 0.02, waits


def test_prepare_reads_and_writes_gcs(built, gcs, tok, tmp_path):
    """gs:// inputs (a glob) and tokenizer to a gs:// store, the same bytes as from and to
    local files."""
    docs = make_docs(60, seed=5)
    local = make_store(tmp_path / "local", tok, docs, rows_per_shard=5)
    gcs.upload(str(tmp_path / "local"), "bucket/corpus")
    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), tok_dir)
    gcs.upload(str(tok_dir), "bucket/tokenizer")
    remote_tok = Tokenizer.from_dir("gs://bucket/tokenizer")
    assert remote_tok.vocab_size == tok.vocab_size
    result = prepare.prepare_store(
        ["gs://bucket/corpus/*.jsonl"],
        remote_tok,
        "gs://bucket/prepared",
        seq_len=T,
        rows_per_shard=5,
    )
    assert result["inputs"][0]["path"] == "gs://bucket/corpus/c.jsonl"
    want = json.loads((local / "manifest.json").read_text())
    assert [s["sha256"] for s in result["shards"]] == [s["sha256"] for s in want["shards"]]
    it = DataIterator(config("gs://bucket/prepared", global_batch=4), None, single())
    ref = DataIterator(config(local, global_batch=4), None, single())
    np.testing.assert_array_equal(it.local_batch(2)["tokens"], ref.local_batch(2)["tokens"])
    it.close(), ref.close()


# ---- mixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second(tmp_path_factory, tok):
    return make_store(tmp_path_factory.mktemp("b"), tok, make_docs(80, seed=9), seed=1)


def test_sources_are_parsed_and_checked():
    assert mixture.parse_sources("gs://b/x:0.7, /local/y:0.3") == (
        ("gs://b/x", 0.7),
        ("/local/y", 0.3),
    )
    assert mixture.parse_sources([{"path": "a", "weight": 2}, ("b", 1), "c:0"]) == (
        ("a", 2.0),
        ("b", 1.0),
        ("c", 0.0),
    )
    assert mixture.parse_sources("") == ()
    for spec, match in [
        ("a:-1,b:1", r"weight -1.0; expected a finite number >= 0"),
        ("a:inf,b:1", r"weight inf; expected a finite number >= 0"),
        ("a:nan,b:1", r"weight nan; expected a finite number >= 0"),
        ("a:1e308,b:1e308", r"the weights' sum overflows"),
        ("a:0,b:0", r"every weight is 0"),
        ("gs://bucket/store", r"expected PATH:WEIGHT"),
        ("a:x", r"weight 'x' is not a number"),
    ]:
        with pytest.raises(DataError, match=match):
            mixture.parse_sources(spec)
    with pytest.raises(DataError, match=r"data.path='x' and data.sources are both set"):
        DataConfig(path="x", format="store", seq_len=T, global_batch=8, sources="a:1")


def test_every_batch_holds_each_share_to_within_a_row(built, second, tmp_path):
    first, _ = built
    spec = f"{first}:0.7,{second}:0.3"
    cfg = DataConfig(path="", format="text", seq_len=T, global_batch=10, sources=spec, seed=3)
    assert cfg.format == "store" and cfg.sources == ((str(first), 0.7), (str(second), 0.3))
    it = DataIterator(cfg, None, single())
    mix = it._mixture
    counts = mix.counts(np.arange(400))
    assert set(counts[:, 0]) == {7} and set(counts[:, 1]) == {3}
    by_source = [
        {row.tobytes() for row in store.TokenStore(str(p)).read(np.arange(_rows(p)))[0]}
        for p in (first, second)
    ]
    for k in range(20):
        tokens = it.local_batch(k)["tokens"].astype(np.uint16).astype(np.int32)
        mine = [sum(row.tobytes() in rows for row in tokens) for rows in by_source]
        assert mine == [7, 3]
    # 0.55 / 0.45 of 10 rows: 5 or 6 and 4 or 5 rows, and the long-run shares are exact.
    odd = mixture.Mixture(mix.stores, [0.55, 0.45], 3, 10)
    counts = odd.counts(np.arange(4000))
    assert set(counts[:, 0]) == {5, 6} and (counts.sum(axis=1) == 10).all()
    assert counts[:, 0].mean() == pytest.approx(5.5, abs=0.05)
    np.testing.assert_array_equal(odd.consumed(4000), counts.sum(axis=0))
    it.close()


def test_mixture_is_a_function_of_seed_and_step(built, second):
    first, _ = built
    cfg = dict(path="", seq_len=T, global_batch=8, format="store", seed=1)
    spec = [f"{first}:0.5", f"{second}:0.5"]
    a = DataIterator(DataConfig(**cfg, sources=spec), None, single())
    run = [np.asarray(next(a)["tokens"]) for _ in range(30)]
    assert a.source_tokens() == {
        str(first): int(a._mixture.consumed(30)[0]) * T,
        str(second): int(a._mixture.consumed(30)[1]) * T,
    }
    assert sum(a.source_tokens().values()) == 30 * 8 * T
    b = DataIterator(DataConfig(**cfg, sources=spec), None, single())
    b.restore({"step": 25})
    for k in range(25, 30):
        np.testing.assert_array_equal(np.asarray(next(b)["tokens"]), run[k])
    a.close(), b.close()


def test_new_weights_at_a_resume_continue_as_if_used_from_the_start(built, second):
    """Weights changed at step k (0.75/0.25 -> 0.25/0.75): each source continues from where
    the new weights would have left it, so the source whose weight grew skips rows and replays
    none, and the one whose weight shrank replays just the rows the old weights took beyond the
    new weights' share; nothing else repeats."""
    first, _ = built
    cfg = dict(path="", seq_len=T, global_batch=8, format="store", seed=2)
    old = DataIterator(DataConfig(**cfg, sources=f"{first}:0.75,{second}:0.25"), None, single())
    new = DataIterator(DataConfig(**cfg, sources=f"{first}:0.25,{second}:0.75"), None, single())
    rows = [store.TokenStore(str(p)).read(np.arange(_rows(p)))[0] for p in (first, second)]
    index = [{r.astype(np.int32).tobytes(): i for i, r in enumerate(x)} for x in rows]

    def by_source(batches):
        out = ([], [])
        for batch in batches:
            for row in batch["tokens"]:
                key = row.tobytes()
                (source,) = [i for i in (0, 1) if key in index[i]]
                out[source].append(index[source][key])
        return out

    k, n = 2, 4
    before = by_source(old.local_batch(s) for s in range(k))
    new_before = by_source(new.local_batch(s) for s in range(k))
    resumed = DataIterator(DataConfig(**cfg, sources=f"{first}:0.25,{second}:0.75"), None, single())
    resumed.restore({"step": k})
    after = by_source(jax.device_get(next(resumed)) for _ in range(k, n))
    assert after == by_source(new.local_batch(s) for s in range(k, n))
    # Within one epoch of each store, rows are distinct positions of its order.
    assert len(new_before[1]) + len(after[1]) <= _rows(second)
    # Grew: none of the rows it gave before is given again, and the new weights' share of
    # the first k steps beyond what it gave is skipped.
    assert not set(after[1]) & set(before[1])
    assert len(new_before[1]) > len(before[1])
    assert set(new_before[1]) >= set(before[1])
    assert not set(after[1]) & set(new_before[1])
    # Shrank: replays rows the old weights took beyond the new weights' share, from the
    # first of them on, and nothing else.
    replayed = set(after[0]) & set(before[0])
    extra = set(before[0]) - set(new_before[0])
    assert replayed and replayed <= extra
    assert len(replayed) == min(len(after[0]), len(extra))
    assert not set(after[0]) & set(new_before[0])
    for it in (old, new, resumed):
        it.close()


def test_mixture_refuses_different_tokenizers(built, tmp_path):
    first, _ = built
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}
    hf = HFTokenizer(models.WordLevel(words, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    other = make_store(
        tmp_path / "w", Tokenizer.from_file(tmp_path / "tokenizer.json"), ["a b"] * 9
    )
    with pytest.raises(DataError, match=r"the data sources were made with different tokenizers"):
        DataIterator(
            DataConfig(
                path="", format="store", seq_len=T, global_batch=2, sources=f"{first}:1,{other}:1"
            ),
            None,
            single(),
        )


# ---- training from stores ------------------------------------------------------------------------


def _train_config(steps, **data):
    from configs import tiny

    cfg = tiny.get_config()
    cfg.data.update(seq_len=T, global_batch=8, tokenizer="", **data)
    cfg.train.update(steps=steps, log_every=1)
    cfg.checkpoint.update(save_every=2, async_save=False)
    return cfg


def _params(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return jax.tree.leaves(ocp.StandardCheckpointer().restore(path)["params"])


@pytest.mark.parametrize("kind", ["store", "mixture"])
def test_training_from_a_store_or_a_mixture_resumes_bit_for_bit(built, second, tmp_path, kind):
    """A run reads a store (no tokenizer needed) or a 0.75 / 0.25 mixture of two. The
    command, killed with SIGKILL once its step-4 checkpoint is committed and rerun to step 12,
    ends with the parameters of a straight 12-step run."""
    from llama_jax import distill

    first, _ = built
    mix = {"path": "", "sources": f"{first}:0.75,{second}:0.25"}
    data = {"path": str(first)} if kind == "store" else mix
    steps = 12
    straight = distill.run(_train_config(steps, **data), str(tmp_path / "straight"))

    killed = tmp_path / "killed"
    flags = [f"--config.data.{k}={v}" for k, v in data.items()] + [
        f"--config.data.seq_len={T}",
        "--config.data.global_batch=8",
        "--config.data.tokenizer=",
        f"--config.train.steps={steps}",
        "--config.checkpoint.save_every=4",
        "--config.checkpoint.async_save=false",
    ]
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/tiny.py", f"--workdir={killed}"]
    env = dict(os.environ, PYTHONPATH=REPO, JAX_DEFAULT_MATMUL_PRECISION="highest")
    proc = subprocess.Popen(
        cmd + flags, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    marker = killed / "checkpoints" / "4" / "commit_success.txt"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.kill()
    _, err = proc.communicate()
    assert marker.exists(), err.decode()[-3000:]
    assert not (killed / "checkpoints" / str(steps)).exists()

    resumed = distill.run(_train_config(steps, **data), str(killed))
    assert resumed["loss"] == straight["loss"]
    for a, b in zip(_params(tmp_path / "straight", steps), _params(killed, steps), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if kind == "mixture":
        logged = [json.loads(x) for x in open(tmp_path / "straight" / "metrics.jsonl")]
        last = [r for r in logged if "loss" in r][-1]
        assert last[f"tokens/{first}"] == steps * 6 * T
        assert last[f"tokens/{second}"] == steps * 2 * T


def test_a_workdir_in_the_data_is_refused(built, second, tmp_path):
    from llama_jax import distill
    from llama_jax.errors import ConfigError

    first, _ = built
    mix = {"path": "", "sources": f"{first}:0.5,{second}:0.5"}
    for data, workdir, why in (
        ({"path": str(first)}, first, "is the input"),
        ({"path": str(first)}, first / "run", "is inside the input"),
        (mix, second / "run", "is inside the input"),
    ):
        with pytest.raises(ConfigError, match=f"--workdir={workdir} {why}"):
            distill.run(_train_config(2, **data), str(workdir))
    assert not (first / "run").exists() and not (second / "run").exists()


def test_a_store_rebuilt_under_a_resumed_run_is_refused(tok, tmp_path):
    """A checkpoint records each store's digest: the same path rebuilt with other rows (here
    another shuffle seed) is refused at resume, before anything is loaded."""
    from llama_jax import distill
    from llama_jax.errors import ConfigError

    docs = make_docs(200, seed=4)
    path = make_store(tmp_path / "data", tok, docs)
    distill.run(_train_config(2, path=str(path)), str(tmp_path / "run"))
    make_store(tmp_path / "data", tok, docs, seed=1, overwrite=True)
    with pytest.raises(ConfigError, match=r"holds other rows than when the checkpoint was"):
        distill.run(_train_config(4, path=str(path)), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints" / "4").exists()


def test_distillation_checks_a_store_against_the_teachers_tokenizer(built, tmp_path):
    """Without data.tokenizer, a store made with another tokenizer file than the teacher's is
    refused before anything is loaded; naming the store's tokenizer in data.tokenizer runs."""
    from flax import nnx

    from configs import distill_tiny
    from llama_jax import distill, nn
    from llama_jax.config import get_preset

    other = tmp_path / "other_tokenizer.json"
    raw = json.loads(open(os.path.join(TOKENIZER_DIR, "tokenizer.json")).read())
    other.write_text(json.dumps(raw, indent=3))
    teacher = tmp_path / "teacher"
    write_tiny_model_dir(teacher, nn.Llama(get_preset("tiny"), rngs=nnx.Rngs(3)), str(other))

    def cfg(tokenizer):
        c = distill_tiny.get_config(str(teacher))
        c.data.update(path=str(built[0]), seq_len=T, global_batch=8, tokenizer=tokenizer)
        c.train.update(steps=1, log_every=1)
        c.checkpoint.update(save_every=1, async_save=False)
        return c

    with pytest.raises(DataError, match=r"made with another tokenizer .*\(the teacher's"):
        distill.run(cfg(""), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    from llama_jax.distill import cache_writer

    with pytest.raises(DataError, match=r"made with another tokenizer .*\(the teacher's"):
        cache_writer.write_teacher_logits(cfg(""), tmp_path / "logits", top_k=4)
    assert not (tmp_path / "logits").exists()
    result = distill.run(cfg(os.path.join(TOKENIZER_DIR, "tokenizer.json")), str(tmp_path / "ok"))
    assert np.isfinite(result["loss"])


def test_perplexity_over_a_store_scores_every_row_once(built, tok, tmp_path):
    """evals.store_perplexity scores each row's tokens against the next one of their own
    document: the same sum as the training loss over all rows at once; launch.evaluate
    --data=STORE reports it."""
    import math

    from flax import nnx

    from llama_jax import evals, nn
    from llama_jax.config import get_preset

    first, _ = built
    model = nn.Llama(get_preset("tiny"), rngs=nnx.Rngs(0))
    got = evals.store_perplexity(model, tok, str(first), batch_size=8)
    rows = store.TokenStore(str(first)).read(np.arange(_rows(first)))
    batch = pipeline.row_fields(*(x.astype(np.int32) for x in rows))
    total, count = nn.token_loss_sum(model, batch, 64)
    assert got["rows"] == _rows(first) and got["seq_len"] == T
    assert got["tokens"] == int(count) == int(batch["loss_mask"].sum())
    assert got["perplexity"] == pytest.approx(math.exp(float(total) / float(count)), rel=1e-5)

    # The command: a converted model directory and the store, one JSON line.
    model_dir = tmp_path / "model"
    write_tiny_model_dir(model_dir, model)
    argv = ["evaluate", f"--model_dir={model_dir}", f"--data={first}", "--dtype=float32"]
    result = _evaluate_cli(argv)
    assert result["split"] == "store" and result["tokens"] == got["tokens"]
    assert result["perplexity"] == pytest.approx(got["perplexity"], rel=1e-4)

    # A tokenizer file other than the store's is refused, by the library and the command.
    other = tmp_path / "other"
    other.mkdir()
    raw = json.loads(open(os.path.join(TOKENIZER_DIR, "tokenizer.json")).read())
    (other / "tokenizer.json").write_text(json.dumps(raw, indent=3))
    with pytest.raises(DataError, match="was made with another tokenizer"):
        evals.store_perplexity(model, Tokenizer.from_dir(other), str(first), batch_size=8)
    err = _evaluate_cli([*argv, f"--tokenizer={other}"], code=2)
    assert "was made with another tokenizer" in err and "Traceback" not in err


def _evaluate_cli(argv, code=0):
    """launch.evaluate's main in this process through the error boundary: its JSON line, or
    with `code` != 0 its one-line error."""
    import contextlib
    import io

    from absl import flags

    from launch import common
    from launch import evaluate as cli

    flags.FLAGS.unparse_flags()
    out, err = io.StringIO(), io.StringIO()
    with (
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        mp.setattr(common, "init_distributed", lambda: None)
        mp.setattr(common, "quiet_logs", lambda: None)
        mp.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            common.run(cli.main)
    assert (exit_info.value.code or 0) == code, err.getvalue()[-2000:]
    if code:
        return err.getvalue()
    (line,) = [x for x in out.getvalue().splitlines() if x.startswith("{")]
    return json.loads(line)


def test_training_and_perplexity_read_a_store_on_gcs(built, gcs, tok, tmp_path):
    """The same run and the same perplexity from gs:// (the emulator, 30 ms a request)
    as from the local copy of the store."""
    from flax import nnx

    from llama_jax import distill, evals, nn
    from llama_jax.config import get_preset

    remote = distill.run(_train_config(2, path="gs://bucket/store"), str(tmp_path / "remote"))
    local = distill.run(_train_config(2, path=str(built[0])), str(tmp_path / "local"))
    assert remote["loss"] == local["loss"]
    model = nn.Llama(get_preset("tiny"), rngs=nnx.Rngs(0))
    on_gcs = evals.store_perplexity(model, tok, "gs://bucket/store", batch_size=8)
    assert on_gcs == evals.store_perplexity(model, tok, str(built[0]), batch_size=8)


def test_distillation_and_evaluation_read_models_and_stores_on_gcs(
    built, second, gcs, tok, tmp_path
):
    """On gs:// (the emulator, 30 ms a request): distillation from a Hugging Face teacher
    directory and a store gives the run of the local copies; the teacher's logit cache written
    from the remote store holds the records written from the local one; launch.evaluate scores
    a converted model directory (Orbax weights, tokenizer) against the store as locally."""
    from flax import nnx
    from hf_models import make_hf_model

    from configs import distill_tiny
    from llama_jax import distill, nn
    from llama_jax.config import get_preset
    from llama_jax.distill import cache as logit_cache
    from llama_jax.distill import cache_writer

    teacher = tmp_path / "teacher"
    make_hf_model(teacher, seed=0, vocab_size=263, num_key_value_heads=1)
    gcs.upload(str(teacher), "bucket/teacher")

    def cfg(teacher_dir, data_path):
        c = distill_tiny.get_config(teacher_dir)
        c.data.update(path=data_path, seq_len=T, global_batch=8, tokenizer="")
        c.train.update(steps=2, log_every=1)
        c.checkpoint.update(save_every=2, async_save=False)
        return c

    remote = distill.run(cfg("gs://bucket/teacher", "gs://bucket/store"), str(tmp_path / "r"))
    local = distill.run(cfg(str(teacher), str(built[0])), str(tmp_path / "l"))
    assert remote["loss"] == local["loss"] and np.isfinite(remote["loss"])

    for name, data_path in (("rc", "gs://bucket/store"), ("lc", str(built[0]))):
        cache_writer.write_teacher_logits(
            cfg(str(teacher), data_path), tmp_path / name, top_k=4, steps_per_shard=2
        )
    rc, lc = logit_cache.LogitCache(tmp_path / "rc"), logit_cache.LogitCache(tmp_path / "lc")
    for step in range(2):
        np.testing.assert_array_equal(rc.read(step, range(8))[0], lc.read(step, range(8))[0])
    digest = store.TokenStore(str(built[0])).manifest.digest
    assert rc.meta["data"]["stores"] == lc.meta["data"]["stores"] == [digest]
    assert rc.meta["data"]["path"] == "gs://bucket/store"
    # Another store, or a mixture, is named as a difference before any work.
    from llama_jax.distill import DistillConfig

    def differences(**data):
        c = cfg(str(teacher), str(built[0]))
        c.data.update(**data)
        return [m.split(":")[0] for m in lc.mismatches(DistillConfig.of(c).data)]

    assert differences() == []
    assert differences(path=str(second)) == ["data.path", "data.stores"]
    mixed = differences(path="", sources=f"{built[0]}:0.75,{second}:0.25")
    assert mixed == ["data.path", "data.sources", "data.stores"]

    model_dir = tmp_path / "model"
    write_tiny_model_dir(model_dir, nn.Llama(get_preset("tiny"), rngs=nnx.Rngs(3)))
    gcs.upload(str(model_dir), "bucket/model")
    results = []
    for where, data_path in (("gs://bucket/model", "gs://bucket/store"), (model_dir, built[0])):
        argv = ["evaluate", f"--model_dir={where}", f"--data={data_path}", "--dtype=float32"]
        results.append(_evaluate_cli(argv))
    assert results[0]["tokens"] == results[1]["tokens"] > 0
    assert results[0]["perplexity"] == results[1]["perplexity"]
