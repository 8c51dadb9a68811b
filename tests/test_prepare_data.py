"""launch.prepare_data and the library behind it: every input format read back token for token,
the same store whatever the worker count, a shuffle across files, resuming an interrupted or
damaged store, the two packings, and every bad input a user can give."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llama_jax.data import corpus, packing, prepare, store
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import ConfigError, DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO, "configs", "data")
BOS, EOS = 1, 2
T = 64


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOKENIZER_DIR)


def make_docs(n, seed=0):
    """n documents of words from the tiny corpus with log-normal lengths (1 to ~150 words), so
    some are longer than a row of T tokens."""
    with open(os.path.join(TOKENIZER_DIR, "tiny_corpus.txt")) as f:
        words = sorted({w.strip(".,") for w in f.read().split()} - {""})
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.3, 0.9, size=n).astype(int), 1, 150)
    return [" ".join(rng.choice(words, size=k)) for k in lengths]


def encoded(tok, docs):
    return sorted(tuple(ids) for ids in tok.encode_batch(docs, add_bos=True, add_eos=True))


def run(tok, inputs, out, **kw):
    kw.setdefault("seq_len", T)
    kw.setdefault("rows_per_shard", 8)
    inputs = [os.fspath(p) for p in (inputs if isinstance(inputs, list) else [inputs])]
    return prepare.prepare_store(inputs, tok, os.fspath(out), **kw)


def read_all(out):
    s = store.TokenStore(os.fspath(out))
    tokens, segment_ids = s.read(np.arange(s.num_rows))
    return s.manifest, tokens, segment_ids


def stream_documents(out):
    """The documents of a concat store in store order: its tokens back to back, cut after EOS."""
    _, tokens, segment_ids = read_all(out)
    stream = tokens[segment_ids > 0]
    ends = np.flatnonzero(stream == EOS) + 1
    return [tuple(d) for d in np.split(stream, ends) if len(d)]


def segments(out):
    """Every segment of every row, in store order."""
    _, tokens, segment_ids = read_all(out)
    out = []
    for row, seg in zip(tokens, segment_ids, strict=True):
        for s in range(1, seg.max() + 1):
            out.append(tuple(row[seg == s]))
    return out


def files(directory):
    return {
        name: (directory / name).read_bytes()
        for name in sorted(os.listdir(directory))
        if (directory / name).is_file()
    }


def write_jsonl(path, docs, compress=None, field="text"):
    lines = "".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs)).encode()
    if compress == "gz":
        lines = gzip.compress(lines)
    elif compress == "zst":
        lines = zstandard.ZstdCompressor().compress(lines)
    path.write_bytes(lines)
    return path


def write_arrow_dataset(directory, docs, parts=2):
    """A datasets save_to_disk directory: Arrow IPC streams listed by state.json."""
    directory.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{parts:05d}.arrow" for i in range(parts)]
    for i, name in enumerate(names):
        table = pa.table({"text": docs[i::parts], "n": list(range(len(docs)))[i::parts]})
        with pa.OSFile(str(directory / name), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table, max_chunksize=17)
    state = {"_data_files": [{"filename": n} for n in names], "_split": "train"}
    (directory / "state.json").write_text(json.dumps(state))
    (directory / "dataset_info.json").write_text("{}")
    return directory


def write_input(tmp_path, fmt, docs):
    if fmt in ("jsonl", "jsonl.gz", "jsonl.zst"):
        return write_jsonl(tmp_path / f"c.{fmt}", docs, fmt.partition(".")[2] or None)
    if fmt == "parquet":
        path = tmp_path / "c.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=40)
        return path
    if fmt == "text":
        path = tmp_path / "c.txt"
        path.write_text("\n\n \n".join(docs) + "\n")
        return path
    if fmt == "text_dir":
        directory = tmp_path / "docs"
        directory.mkdir()
        for i, d in enumerate(docs):
            (directory / f"{i:04d}.txt").write_text(d + "\n")
        return directory
    return write_arrow_dataset(tmp_path / "dataset", docs)


# ---- formats and the round trip ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "text", "text_dir", "arrow"]
)
def test_every_format_round_trips(tmp_path, tok, fmt):
    docs = make_docs(120)
    path = write_input(tmp_path, fmt, docs)
    result = run(tok, path, tmp_path / "store")
    # Tokens in the store are exactly the tokenizer's encodings of the documents, each once.
    assert sorted(stream_documents(tmp_path / "store")) == encoded(tok, docs)
    assert result["documents"] == 120 and result["inputs"][0]["path"] == str(path)
    read = [path] if path.is_file() else [p for p in path.iterdir() if p.suffix != ".json"]
    assert result["inputs"][0]["bytes"] == sum(p.stat().st_size for p in read)


def test_manifest_describes_the_store(tmp_path, tok):
    docs = make_docs(150)
    result = run(tok, write_input(tmp_path, "jsonl", docs), tmp_path / "store")
    manifest, tokens, segment_ids = read_all(tmp_path / "store")
    raw = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert raw["format"] == "llama_jax.token_store" and raw["version"] == 1
    assert raw["token_dtype"] == "uint16" and raw["vocab_size"] == tok.vocab_size == 256
    assert raw["tokenizer"]["sha256"] == store.tokenizer_fingerprint(tok.path)
    assert raw["seq_len"] == T and raw["pack"] == "concat"
    assert raw["rows"] == len(tokens) and raw["tokens"] == int((segment_ids > 0).sum())
    assert raw["tokens"] == sum(len(d) for d in encoded(tok, docs))
    assert raw["padding_fraction"] == pytest.approx(1 - raw["tokens"] / (raw["rows"] * T))
    assert sum(s["documents"] for s in raw["shards"]) == 150 == raw["documents"]
    assert [s["rows"] for s in raw["shards"]][:-1] == [8] * (len(raw["shards"]) - 1)
    for shard in raw["shards"]:
        path = tmp_path / "store" / shard["name"]
        assert shard["bytes"] == path.stat().st_size
        assert shard["sha256"] == store.file_sha256(store.epath.Path(path))
        # A shard is a plain .npy of row records.
        records = np.load(path, allow_pickle=False)
        assert records.shape == (shard["rows"],) and records.dtype == manifest.row_dtype
    assert {k: result[k] for k in raw} == raw


def test_mixed_inputs_and_globs(tmp_path, tok):
    docs = make_docs(90)
    write_jsonl(tmp_path / "a.jsonl", docs[:30])
    write_jsonl(tmp_path / "b.jsonl.gz", docs[30:60], "gz")
    pq.write_table(pa.table({"text": docs[60:]}), tmp_path / "c.parquet")
    result = run(tok, [tmp_path / "*.jsonl*", tmp_path / "c.parquet"], tmp_path / "store")
    assert sorted(stream_documents(tmp_path / "store")) == encoded(tok, docs)
    assert [os.path.basename(i["path"]) for i in result["inputs"]] == [
        "a.jsonl",
        "b.jsonl.gz",
        "c.parquet",
    ]
    # --format names the format of files whose names do not.
    (tmp_path / "a.jsonl").rename(tmp_path / "a.records")
    result = run(tok, tmp_path / "a.records", tmp_path / "named", format="jsonl")
    assert result["inputs"][0]["format"] == "jsonl" and result["documents"] == 30


def test_text_documents_match_the_text_reader(tmp_path):
    """A text file splits into documents as the training pipeline's text reader splits it."""
    from llama_jax.data import read_text

    text = "a b\r\nc\n\n  \n\n  indented d\ne\n\t\n\nlast"
    path = tmp_path / "t.txt"
    path.write_text(text)
    source = corpus.find_inputs([str(path)])[0]
    docs = list(corpus.documents(source, "text", corpus.ReadStats(), strict=False))
    assert docs == read_text(store.epath.Path(path)) == ["a b\nc", "  indented d\ne", "last"]


# ---- shuffle, determinism, resume -------------------------------------------------------------


def test_same_store_whatever_the_workers(tmp_path, tok):
    docs = make_docs(400)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    kw = dict(bucket_bytes=4000, pack="best_fit")
    one = run(tok, path, tmp_path / "one", workers=1, **kw)
    two = run(tok, path, tmp_path / "two", workers=2, **kw)
    assert one["settings"]["buckets"] > 4
    assert files(tmp_path / "one") == files(tmp_path / "two")
    other = run(tok, path, tmp_path / "seed1", workers=2, seed=1, **kw)
    assert files(tmp_path / "seed1") != files(tmp_path / "one")
    assert sorted(segments(tmp_path / "seed1")) == sorted(segments(tmp_path / "one"))
    assert one["rows"] == two["rows"] and other["documents"] == 400


@pytest.mark.parametrize("bucket_bytes", [None, 3000], ids=["one bucket", "buckets"])
def test_documents_are_shuffled_across_files(tmp_path, tok, bucket_bytes):
    docs = make_docs(300)
    write_jsonl(tmp_path / "a.jsonl", docs[:150])
    write_jsonl(tmp_path / "b.jsonl", docs[150:])
    kw = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
    run(tok, [tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "store", **kw)
    order = stream_documents(tmp_path / "store")
    in_file_order = [tuple(ids) for ids in tok.encode_batch(docs, add_bos=True, add_eos=True)]
    assert sorted(order) == sorted(in_file_order) and order != in_file_order
    from_a = np.array([d in set(in_file_order[:150]) for d in order])
    # Both files are spread over the whole store: each half holds about half of a's documents.
    assert 0.3 < from_a[:150].mean() < 0.7 and 0.3 < from_a[150:].mean() < 0.7


def test_rerun_keeps_intact_shards_and_rewrites_the_rest(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(200))
    out = tmp_path / "store"
    first = run(tok, path, out)
    want = files(out)
    shards = sorted(n for n in want if n.startswith("shard-"))
    assert len(shards) >= 4 and first["written"] == len(shards)
    stamp = {n: (os.stat(out / n).st_ino, os.stat(out / n).st_mtime_ns) for n in shards}

    # Damaged and missing shards of a complete store.
    raw = bytearray((out / shards[1]).read_bytes())
    raw[-10] ^= 0xFF
    (out / shards[1]).write_bytes(bytes(raw))
    (out / shards[2]).unlink()
    again = run(tok, path, out)
    assert files(out) == want
    assert again["kept"] == len(shards) - 2 and again["written"] == 2
    for name in shards[3:]:
        assert (os.stat(out / name).st_ino, os.stat(out / name).st_mtime_ns) == stamp[name]

    # A run killed before its manifest, with a shard half written.
    (out / "manifest.json").unlink()
    (out / shards[-1]).unlink()
    (out / (shards[-1] + ".tmp")).write_bytes(b"partial")
    run(tok, path, out)
    assert files(out) == want

    # Complete and intact: nothing is written.
    done = run(tok, path, out)
    assert done["written"] == 0 and files(out) == want


def test_resume_after_the_first_pass_does_not_read_again(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(200))
    run(tok, path, tmp_path / "fresh")
    out = tmp_path / "store"
    emit = prepare._ShardWriter._emit

    def crash_after_two(self, rows):
        if len(self.shards) == 2:
            raise KeyboardInterrupt("killed")
        emit(self, rows)

    monkeypatch.setattr(prepare._ShardWriter, "_emit", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(tok, path, out)
    assert not (out / "manifest.json").exists() and (out / prepare.SPILL_DIR).is_dir()
    monkeypatch.setattr(prepare._ShardWriter, "_emit", emit)

    def no_reading(*args):
        raise AssertionError("the inputs were read again")

    monkeypatch.setattr(corpus, "documents", no_reading)
    result = run(tok, path, out)
    assert result["kept"] == 2 and files(out) == files(tmp_path / "fresh")
    assert not (out / prepare.SPILL_DIR).exists()


def test_other_settings_need_overwrite(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(100))
    run(tok, path, tmp_path / "store")
    with pytest.raises(ConfigError, match="made from other inputs or settings; pass --overwrite"):
        run(tok, path, tmp_path / "store", seed=3)
    run(tok, path, tmp_path / "store", seed=3, overwrite=True, rows_per_shard=100)
    run(tok, path, tmp_path / "fresh", seed=3, rows_per_shard=100)
    # The old store's extra shards are gone: the result is the fresh store.
    assert files(tmp_path / "store") == files(tmp_path / "fresh")


def test_a_failed_overwrite_leaves_the_old_store_readable(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(100))
    run(tok, path, tmp_path / "store")
    before = files(tmp_path / "store")
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "a b c"}\n' * 500)[:-30])
    with pytest.raises(DataError, match="is truncated"):
        run(tok, bad, tmp_path / "store", overwrite=True)
    assert files(tmp_path / "store") == before
    assert store.TokenStore(str(tmp_path / "store")).manifest.num_rows > 0


# ---- packing ----------------------------------------------------------------------------------


def rows_of(rows):
    return [
        [list(r[:n]), list(np.flatnonzero(s[:n])), int(d)]
        for r, s, n, d in zip(rows.tokens, rows.starts, rows.lengths, rows.documents, strict=True)
    ]


def piece(doc_id, n):
    return np.full(n, doc_id, np.uint16)


def test_best_fit_places_whole_documents_in_the_fullest_row():
    p = packing.BestFitPacker(10, np.dtype(np.uint16), open_rows=8)
    docs = [piece(1, 6), piece(2, 5), piece(3, 4), piece(4, 3), piece(5, 12)]
    done = rows_of(p.add(docs))
    # 6 opens a row; 5 does not fit it (room 4) and opens another; 4 fills the first row; 3
    # joins the second; 12 is a whole row of 10 and a piece of 2 that fills the second row.
    assert done == [
        [[1] * 6 + [3] * 4, [0, 6], 2],
        [[5] * 10, [0], 1],
        [[2] * 5 + [4] * 3 + [5] * 2, [0, 5, 8], 2],
    ]
    assert rows_of(p.finish()) == []
    p = packing.BestFitPacker(10, np.dtype(np.uint16), open_rows=1)
    assert rows_of(p.add([piece(1, 6), piece(2, 5)])) == [[[1] * 6, [0], 1]]
    assert rows_of(p.finish()) == [[[2] * 5, [0], 1]]


def test_concat_runs_documents_across_rows():
    p = packing.ConcatPacker(4, np.dtype(np.uint16))
    assert rows_of(p.add([piece(1, 3), piece(2, 6)])) == [
        [[1, 1, 1, 2], [0, 3], 2],
        [[2, 2, 2, 2], [0], 0],
    ]
    last = p.finish()
    assert rows_of(last) == [[[2], [0], 0]] and list(last.tokens[0]) == [2, 0, 0, 0]


def test_best_fit_cuts_only_long_documents_and_reports_padding(tmp_path, tok):
    docs = make_docs(300, seed=4)
    path = write_jsonl(tmp_path / "c.jsonl", docs)
    concat = run(tok, path, tmp_path / "concat", pack="concat")
    best = run(tok, path, tmp_path / "best", pack="best_fit")
    for result, out in ((concat, "concat"), (best, "best")):
        _, tokens, segment_ids = read_all(tmp_path / out)
        assert result["padding_fraction"] == pytest.approx(1 - (segment_ids > 0).mean())
    # concat pads only its last row; best_fit pads more, but cuts no document that fits a row.
    assert concat["padding_fraction"] * concat["rows"] < 1
    assert best["padding_fraction"] > concat["padding_fraction"] and best["rows"] > concat["rows"]
    short = [d for d in encoded(tok, docs) if len(d) <= T]
    assert set(short) <= set(segments(tmp_path / "best"))
    assert not set(short) <= set(segments(tmp_path / "concat"))


# ---- bad input --------------------------------------------------------------------------------


def test_no_input_or_no_match(tmp_path, tok):
    with pytest.raises(DataError, match=r"no input matches '.*nothing/\*\.jsonl'"):
        run(tok, tmp_path / "nothing" / "*.jsonl", tmp_path / "store")
    with pytest.raises(DataError, match=r"input '.*absent.jsonl' does not exist"):
        run(tok, tmp_path / "absent.jsonl", tmp_path / "store")
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(DataError, match=r"cannot tell the format of '.*x.bin'.*--format"):
        run(tok, tmp_path / "x.bin", tmp_path / "store")
    assert not (tmp_path / "store").exists()


def test_records_without_the_field_are_skipped_or_refused(tmp_path, tok):
    docs = make_docs(20)
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": d}) for d in docs]
    lines[3] = json.dumps({"body": "no text here"})
    lines[7] = json.dumps({"text": None})
    lines[9] = json.dumps({"text": ""})
    path.write_text("\n".join(lines) + "\n")
    said = []
    result = run(tok, path, tmp_path / "store", log=said.append)
    assert result["skipped"] == {"missing_field": 2, "empty": 1} and result["documents"] == 17
    assert "skipped 2 records without a string 'text' (first: " in said[-1]
    assert f"{path}:4" in said[-1]
    kept = [d for i, d in enumerate(docs) if i not in (3, 7, 9)]
    assert sorted(stream_documents(tmp_path / "store")) == encoded(tok, kept)
    with pytest.raises(DataError, match=r"c.jsonl:4: no string 'text' \(absent; keys \['body'\]\)"):
        run(tok, path, tmp_path / "strict", strict=True)
    table = pa.table({"text": ["a b", None, "c"]})
    pq.write_table(table, tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet row group 0 record 1: no string 'text'"):
        run(tok, tmp_path / "p.parquet", tmp_path / "strict", strict=True)
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r"no documents in .*q.parquet.*1 records without a"):
        run(tok, tmp_path / "q.parquet", tmp_path / "none")


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("c.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"c.jsonl:2: not UTF-8"),
        ("c.txt", b"fine\n\nbad \xff byte\n", r"c.txt:3: not UTF-8"),
        ("c.jsonl", b'{"text": "a"}\n{"text": \n', r"c.jsonl:2: not a valid JSON line"),
        ("c.jsonl", b'["a"]\n', r"c.jsonl:1: expected a JSON object, got list"),
        ("c.jsonl.gz", gzip.compress(b'{"text": "a b c"}\n' * 500)[:-30], r"is truncated"),
        ("c.jsonl.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 40, r"c.jsonl.gz is damaged \(gz"),
        (
            "c.jsonl.zst",
            zstandard.ZstdCompressor().compress(b'{"text": "a b c"}\n' * 500)[:-12],
            r"c.jsonl.zst is truncated: its zst stream ends early",
        ),
        ("c.parquet", b"PAR1 this is not parquet PAR1", r"not a readable Parquet file"),
        ("c.jsonl", b"\n  \n", r"no documents in .*c.jsonl.*: 0 records without .*, 0 empty"),
        (
            "c.jsonl",
            b'{"text": "a \\ud83d\\ude00 pair"}\n{"text": "b \\ud800 c"}\n',
            r"c.jsonl:2: the text holds an unpaired surrogate escape \('\\ud800' at character 2\)",
        ),
    ],
    ids=[
        "jsonl utf8",
        "text utf8",
        "bad json",
        "not an object",
        "gz truncated",
        "gz damaged",
        "zst truncated",
        "parquet corrupt",
        "empty corpus",
        "lone surrogate",
    ],
)
def test_unreadable_inputs(tmp_path, tok, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        run(tok, tmp_path / name, tmp_path / "store")
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_corrupt_parquet_column_and_dataset_dict(tmp_path, tok):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"column 'text' holds int64; expected strings"):
        run(tok, tmp_path / "n.parquet", tmp_path / "store")
    good = tmp_path / "g.parquet"
    pq.write_table(pa.table({"text": make_docs(50)}), good, row_group_size=10)
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = b"\x00" * 64
    (tmp_path / "d.parquet").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"d.parquet is not a readable Parquet file"):
        run(tok, tmp_path / "d.parquet", tmp_path / "store")
    dd = tmp_path / "dd"
    write_arrow_dataset(dd / "train", make_docs(10))
    (dd / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(DataError, match=r"is a DatasetDict .*name one split's directory"):
        run(tok, dd, tmp_path / "store")


def test_out_dir_apart_from_inputs(tmp_path, tok):
    docs_dir = write_input(tmp_path, "text_dir", make_docs(5))
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(5))
    for out, why in [
        (docs_dir, "is the input"),
        (docs_dir / "store", "is inside the input"),
        (tmp_path, "contains the input"),
    ]:
        with pytest.raises(ConfigError, match=f"--out_dir={out} {why}"):
            run(tok, [path, docs_dir], out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files that are not a token store's"):
        run(tok, path, tmp_path / "full")
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_options_are_checked(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(5))
    for kw, match in [
        (dict(seq_len=1), r"seq_len=1"),
        (dict(pack="first_fit"), r"pack='first_fit'"),
        (dict(workers=0), r"workers=0"),
        (dict(seed=-1), r"seed=-1"),
        (dict(field=""), r"field is empty"),
        (dict(format="csv"), r"input format 'csv' is unknown"),
    ]:
        with pytest.raises((ConfigError, DataError), match=match):
            run(tok, path, tmp_path / "store", **kw)
    bare = Tokenizer.from_file(tok.path)  # a tokenizer.json alone: no BOS/EOS
    result = run(bare, path, tmp_path / "bare")
    assert result["add_bos"] is False and result["add_eos"] is False
    with pytest.raises(ConfigError, match=r"add_eos=True but the tokenizer .* has no EOS"):
        run(bare, path, tmp_path / "store", add_eos=True)


def test_command_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_docs(60))
    cmd = [sys.executable, "-m", "launch.prepare_data", f"--tokenizer={TOKENIZER_DIR}"]
    env = dict(os.environ, PYTHONPATH=REPO)
    ok = subprocess.run(
        cmd
        + [f"--inputs={path}", "--seq_len=64", f"--out_dir={tmp_path / 'store'}", "--workers=2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "tokenizing: 60 documents (" in ok.stderr and "tokens (" in ok.stderr
    assert "ETA" in ok.stderr and "padding" in ok.stderr and "wrote" in ok.stdout
    assert store.TokenStore(str(tmp_path / "store")).num_rows > 1
    bad = subprocess.run(
        cmd + [f"--inputs={tmp_path}/*.parquet", f"--out_dir={tmp_path / 'other'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        f"error: no input matches '{tmp_path}/*.parquet'"
    )
