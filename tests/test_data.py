"""Data pipeline: exact packing of a hand-made corpus, the (seed, step) -> batch order, resume,
epoch wrap-around, the same global batch on every mesh and across two real processes, remote
(gs://) paths, and every error a user can make."""

import json
import os
import sys
import textwrap

import jax
import numpy as np
import processes
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from jax.sharding import NamedSharding, PartitionSpec
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from llama_jax.data.pipeline import FIELDS, DataConfig, DataIterator
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import DataError
from llama_jax.sharding import create_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SPEC = PartitionSpec(("dcn", "data", "fsdp"))
WORDS = "a b c d e f g h i j".split()  # ids 3..12 after <unk>, <s>, </s>

# Three documents, blank-line separated (one "blank" line holds spaces), packed into rows of 6:
# "a b c" -> [1 3 4 5 2], "d e" -> [1 6 7 2], "f g h i j" -> [1 8 9 10 11 12 2].
TEXT = "a b c\n\nd e\n\n  \n\nf g h i j\n"
JSONL_DOCS = ["a b c", "d e", "f g h i j"]
PACKED = {
    "tokens": [[1, 3, 4, 5, 2, 1], [6, 7, 2, 1, 8, 9], [10, 11, 12, 2, 0, 0]],
    "segment_ids": [[1, 1, 1, 1, 1, 2], [1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]],
    "targets": [[3, 4, 5, 2, 1, 0], [7, 2, 1, 8, 9, 0], [11, 12, 2, 0, 0, 0]],
    "loss_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A word-level tokenizer.json with <s>/</s> as BOS/EOS."""
    directory = tmp_path_factory.mktemp("tok")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(directory)


def sharding(devices=None, **axes):
    return NamedSharding(create_mesh(devices=devices, **axes), BATCH_SPEC)


def single():
    return sharding(devices=jax.devices()[:1])


def config(path, fmt, **kw):
    kw.setdefault("seq_len", 6)
    kw.setdefault("global_batch", 3)
    return DataConfig(path=os.fspath(path), format=fmt, **kw)


def write_rows(path, num_rows, seq_len, dtype=np.int32):
    """A 2-D tokens file whose row r is r*100 + column, so every row names itself."""
    rows = np.arange(num_rows)[:, None] * 100 + np.arange(seq_len)
    np.save(path, rows.astype(dtype))
    return rows


def as_numpy(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def perm(seed, epoch, n):
    return np.random.default_rng((seed, epoch)).permutation(n)


@pytest.fixture()
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


# ---- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "jsonl", "tokens"])
def test_packing_is_exact(tmp_path, tokenizer, fmt):
    if fmt == "text":
        path = tmp_path / "c.txt"
        path.write_text(TEXT)
    elif fmt == "jsonl":
        path = tmp_path / "c.jsonl"
        lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(JSONL_DOCS)]
        path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    else:  # the same documents as a 1-D stream, each ending with EOS (2); no tokenizer needed
        path = tmp_path / "c.npy"
        np.save(path, np.array(PACKED["tokens"], np.uint16).reshape(-1)[:16])
    if fmt == "tokens":
        it = DataIterator(config(path, fmt), None, single(), eos_id=2)
    else:
        it = DataIterator(config(path, fmt), tokenizer, single())
    assert it.num_rows == 3 and it.batches_per_epoch == 1.0
    batch = as_numpy(next(it))
    order = perm(0, 0, 3)
    for name in FIELDS:
        assert batch[name].dtype == np.int32 and batch[name].shape == (3, 6)
        np.testing.assert_array_equal(batch[name], np.array(PACKED[name])[order], err_msg=name)


def test_packing_flags_and_documents_longer_than_a_row(tmp_path, tokenizer):
    path = tmp_path / "c.txt"
    path.write_text("a b c d e f g h i j\n\nd e\n")
    it = DataIterator(
        config(path, "text", seq_len=4, add_bos=False, add_eos=False), tokenizer, single()
    )
    batch = it.local_batch(0)
    in_file_order = np.argsort(perm(0, 0, 3))
    # The 10-token document is cut twice; each piece is segment 1 of its row.
    np.testing.assert_array_equal(
        batch["tokens"][in_file_order], [[3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 6, 7]]
    )
    np.testing.assert_array_equal(
        batch["segment_ids"][in_file_order], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 2, 2]]
    )
    np.testing.assert_array_equal(
        batch["loss_mask"][in_file_order], [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 1, 0]]
    )


def test_tokens_2d_rows_and_segments(tmp_path):
    path = tmp_path / "rows.npy"
    rows = write_rows(path, 5, 4, np.dtype(">i2"))  # a big-endian file converts to int32
    it = DataIterator(config(path, "tokens", seq_len=4, global_batch=5), None, single())
    batch = it.local_batch(0)
    order = perm(0, 0, 5)
    np.testing.assert_array_equal(batch["tokens"], rows[order])
    np.testing.assert_array_equal(batch["segment_ids"], np.ones((5, 4)))
    np.testing.assert_array_equal(batch["loss_mask"], np.tile([1, 1, 1, 0], (5, 1)))

    segments = np.tile([1, 1, 2, 0], (5, 1))
    np.save(tmp_path / "rows.segments.npy", segments.astype(np.uint8))
    it = DataIterator(config(path, "tokens", seq_len=4, global_batch=5), None, single())
    batch = it.local_batch(0)
    np.testing.assert_array_equal(batch["segment_ids"], segments)
    np.testing.assert_array_equal(batch["targets"][:, :3], rows[order][:, 1:])
    np.testing.assert_array_equal(batch["loss_mask"], np.tile([1, 0, 0, 0], (5, 1)))


# ---- order, resume, epochs --------------------------------------------------------------------


def rows_iterator(path, seed=0, shard=None, **kw):
    kw.setdefault("global_batch", 4)
    return DataIterator(config(path, "tokens", seq_len=3, seed=seed, **kw), None, shard or single())


def test_deterministic_and_seed_sensitive(tmp_path):
    path = tmp_path / "rows.npy"
    write_rows(path, 23, 3)
    a, b, c = (rows_iterator(path, seed=s) for s in (7, 7, 8))
    for _ in range(4):
        x, y, z = as_numpy(next(a)), as_numpy(next(b)), as_numpy(next(c))
        for name in FIELDS:
            np.testing.assert_array_equal(x[name], y[name])
    assert not np.array_equal(x["tokens"], z["tokens"])


def test_resume_is_exact(tmp_path):
    path = tmp_path / "rows.npy"
    write_rows(path, 10, 3)
    it = rows_iterator(path, seed=3)
    run = [as_numpy(next(it)) for _ in range(5)]
    assert it.state() == {"step": 5}

    it = rows_iterator(path, seed=3)
    next(it), next(it)
    saved = json.loads(json.dumps(it.state()))
    resumed = rows_iterator(path, seed=3)
    resumed.restore(saved)
    for k in range(2, 5):
        batch = as_numpy(next(resumed))
        for name in FIELDS:
            np.testing.assert_array_equal(batch[name], run[k][name], err_msg=f"{k} {name}")


def test_epochs_wrap_around_without_dropping(tmp_path):
    path = tmp_path / "rows.npy"
    rows = write_rows(path, 10, 3)
    it = rows_iterator(path, seed=5)
    assert it.batches_per_epoch == 2.5
    seen = np.concatenate([np.asarray(next(it)["tokens"])[:, 0] // 100 for _ in range(5)])
    # Batch 2 is the end of epoch 0 (2 rows) and the start of epoch 1 (2 rows).
    expected = np.concatenate([perm(5, 0, 10), perm(5, 1, 10)])
    np.testing.assert_array_equal(seen, expected)
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10))
    np.testing.assert_array_equal(it.local_batch(2)["tokens"], rows[expected[8:12]])


# ---- meshes and processes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "axes", [dict(data=8), dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)], ids=str
)
def test_same_global_batch_on_every_mesh(tmp_path, axes):
    path = tmp_path / "rows.npy"
    write_rows(path, 21, 3)
    reference = rows_iterator(path, global_batch=8).local_batch(1)
    shard = sharding(**axes)
    it = rows_iterator(path, shard=shard, global_batch=8)
    it.restore({"step": 1})
    batch = next(it)
    for name in FIELDS:
        assert batch[name].sharding == shard and batch[name].shape == (8, 3)
        np.testing.assert_array_equal(np.asarray(batch[name]), reference[name])
        for piece in batch[name].addressable_shards:
            np.testing.assert_array_equal(np.asarray(piece.data), reference[name][piece.index])


WORKER = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    port, pid, path, out = sys.argv[1:]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(pid))
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from llama_jax.data import DataConfig, DataIterator
    from llama_jax.sharding import MESH_AXES
    devices = jax.devices()
    layouts = {
        "blocked": devices,
        "interleaved": [d for pair in zip(devices[:4], devices[4:]) for d in pair],
    }
    result = {}
    for name, order in layouts.items():
        mesh = Mesh(np.array(order).reshape(1, 2, 4, 1), MESH_AXES)
        sharding = NamedSharding(mesh, PartitionSpec(("dcn", "data", "fsdp")))
        cfg = DataConfig(path=path, format="tokens", seq_len=3, global_batch=8)
        it = DataIterator(cfg, None, sharding)
        for k in range(3):
            result[f"{name}/{k}/local"] = it.local_batch(k)["tokens"]
            for piece in next(it)["tokens"].addressable_shards:
                result[f"{name}/{k}/row{piece.index[0].start}"] = np.asarray(piece.data)
    np.savez(out, **result)
    """
)


def test_two_processes_read_their_own_rows(tmp_path):
    path = tmp_path / "rows.npy"
    write_rows(path, 13, 3)
    reference = rows_iterator(path, global_batch=8)
    port = processes.free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": REPO}
    processes.run_together(
        [
            [sys.executable, "-c", WORKER, str(port), str(pid), str(path), str(tmp_path / f"{pid}")]
            for pid in range(2)
        ],
        env=env,
        timeout=120,
    )
    mine = {"blocked": [[0, 1, 2, 3], [4, 5, 6, 7]], "interleaved": [[0, 2, 4, 6], [1, 3, 5, 7]]}
    for pid in range(2):
        result = np.load(tmp_path / f"{pid}.npz")
        for layout, positions in mine.items():
            for k in range(3):
                full = reference.local_batch(k)["tokens"]
                np.testing.assert_array_equal(result[f"{layout}/{k}/local"], full[positions[pid]])
                shards = [name for name in result.files if name.startswith(f"{layout}/{k}/row")]
                assert len(shards) == len(positions[pid])
                for row in positions[pid]:
                    np.testing.assert_array_equal(
                        result[f"{layout}/{k}/row{row}"], full[row : row + 1]
                    )


def test_remote_paths(tmp_path, tokenizer):
    """gs:// goes through epath, and 2-D rows are read by seeking instead of memory mapping."""
    local = tmp_path / "bucket"
    local.mkdir()
    (local / "c.txt").write_text(TEXT)
    rows = write_rows(local / "rows.npy", 7, 3)
    np.save(local / "rows.segments.npy", (rows % 3 > 0).astype(np.int8))

    def to_local(fn, path, *args, **kw):
        return fn(os.fspath(path).replace("gs://bucket", os.fspath(local)), *args, **kw)

    mocks = {name: to_local for name in ("open", "exists", "isdir", "stat")}
    with epath_testing.mock_epath(**mocks):
        assert epath.Path("gs://bucket/c.txt").is_file()
        remote_text = DataIterator(config("gs://bucket/c.txt", "text"), tokenizer, single())
        remote_rows = rows_iterator("gs://bucket/rows.npy")
        remote = [remote_text.local_batch(0), remote_rows.local_batch(4)]
    local_batches = [
        DataIterator(config(local / "c.txt", "text"), tokenizer, single()).local_batch(0),
        rows_iterator(local / "rows.npy").local_batch(4),
    ]
    for got, want in zip(remote, local_batches, strict=True):
        for name in FIELDS:
            np.testing.assert_array_equal(got[name], want[name])


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(format="csv"), r"format 'csv' is unknown"),
        (dict(seq_len=1), r"seq_len=1; expected an integer >= 2"),
        (dict(global_batch=0), r"global_batch=0"),
        (dict(seed=-1), r"seed=-1"),
        (dict(format="jsonl", field=""), r"field is empty"),
    ],
)
def test_config_errors(kw, match):
    args = dict(path="x.txt", format="text", seq_len=8, global_batch=8) | kw
    with pytest.raises(DataError, match=match):
        DataConfig(**args)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data file '.*nope.txt' does not exist"):
        DataIterator(config(tmp_path / "nope.txt", "text"), tokenizer, single())


def test_batch_not_divisible_by_mesh(text_file, tokenizer):
    with pytest.raises(DataError, match=r"global_batch=6 .* \{'dcn': 1, 'data': 4, 'fsdp': 1\}"):
        DataIterator(
            config(text_file, "text", global_batch=6), tokenizer, sharding(data=4, fsdp=1, tensor=2)
        )


def test_source_too_small(text_file, tokenizer):
    with pytest.raises(DataError, match=r"makes 3 rows of seq_len=6; global_batch=4 needs"):
        DataIterator(config(text_file, "text", global_batch=4), tokenizer, single())
    path = text_file.parent / "rows.npy"
    write_rows(path, 3, 6)
    with pytest.raises(DataError, match=r"makes 3 rows of seq_len=6; global_batch=4 needs"):
        DataIterator(config(path, "tokens", global_batch=4), None, single())


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"text": "a"}', "{not json"], r"\.jsonl:2: not a valid JSON line"),
        (['{"text": "a"}', "", '{"body": "a"}'], r"\.jsonl:3: expected a JSON object with a str"),
        (['{"text": 3}'], r"\.jsonl:1: expected"),
        (['["a"]'], r"\.jsonl:1: expected"),
    ],
)
def test_bad_jsonl(tmp_path, tokenizer, lines, match):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        DataIterator(config(path, "jsonl", global_batch=1), tokenizer, single())


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((4, 6), np.float32), r"float32 array of shape \(4, 6\); expected a 1-D or 2-D"),
        (np.zeros((2, 2, 6), np.int32), r"shape \(2, 2, 6\); expected a 1-D or 2-D"),
        (np.array([{"a": 1}], dtype=object), r"object array"),
        (np.zeros((4, 5), np.int32), r"rows of 5 tokens .*; expected seq_len=6"),
    ],
)
def test_bad_tokens_file(tmp_path, array, match):
    path = tmp_path / "t.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(DataError, match=match):
        DataIterator(config(path, "tokens", global_batch=1), None, single(), eos_id=2)


def test_unreadable_tokens_files(tmp_path):
    path = tmp_path / "t.npy"
    path.write_bytes(b"not numpy")
    with pytest.raises(DataError, match="is not a readable .npy file"):
        DataIterator(config(path, "tokens", global_batch=1), None, single())
    np.save(path, np.zeros((4, 6), np.int32))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(DataError, match="is truncated"):
        DataIterator(config(path, "tokens", global_batch=1), None, single())
    np.save(path, np.zeros((4, 6), np.int32))
    np.save(tmp_path / "t.segments.npy", np.zeros((4, 5), np.int32))
    with pytest.raises(DataError, match=r"t.segments.npy has shape \(4, 5\); expected .* \(4, 6\)"):
        DataIterator(config(path, "tokens", global_batch=1), None, single())


def test_token_ids_outside_vocab(tmp_path, tokenizer):
    stream = tmp_path / "s.npy"
    np.save(stream, np.array([1, 3, 2, 1, 40, 2]))
    with pytest.raises(DataError, match=r"token id 40 at token 4 is outside \[0, 13\)"):
        DataIterator(config(stream, "tokens", global_batch=1), tokenizer, single())
    with pytest.raises(DataError, match=r"token id 40 at token 4 is outside \[0, 32\)"):
        DataIterator(
            config(stream, "tokens", global_batch=1), None, single(), vocab_size=32, eos_id=2
        )
    text = tmp_path / "c.txt"
    text.write_text(TEXT)
    with pytest.raises(DataError, match=r"c.txt: token id 10 at token 12 is outside \[0, 10\)"):
        DataIterator(config(text, "text", global_batch=1), tokenizer, single(), vocab_size=10)
    # 2-D rows are checked as each host reads them.
    rows = tmp_path / "rows.npy"
    write_rows(rows, 3, 6)
    it = DataIterator(config(rows, "tokens", global_batch=3), None, single(), vocab_size=200)
    with pytest.raises(DataError, match=r"rows.npy: token id 200 in row 2, column 0 is outside"):
        next(it)
    np.save(tmp_path / "rows.segments.npy", -np.ones((3, 6), np.int32))
    it = DataIterator(config(rows, "tokens", global_batch=3), None, single())
    with pytest.raises(DataError, match=r"rows.segments.npy: segment id -1 in row"):
        it.local_batch(0)


def test_missing_tokenizer_or_special_ids(tmp_path, text_file, tokenizer):
    with pytest.raises(DataError, match="format 'text' needs a tokenizer"):
        DataIterator(config(text_file, "text"), None, single())
    stream = tmp_path / "s.npy"
    np.save(stream, np.arange(12))
    with pytest.raises(DataError, match="no EOS id is known; pass a tokenizer"):
        DataIterator(config(stream, "tokens", global_batch=1), None, single())
    bare = Tokenizer.from_file(tokenizer.path)  # a tokenizer.json alone has no BOS/EOS
    with pytest.raises(DataError, match="add_bos=True but the tokenizer .* has no BOS"):
        DataIterator(config(text_file, "text"), bare, single())
    with pytest.raises(DataError, match="add_eos=True but the tokenizer .* has no EOS"):
        DataIterator(config(text_file, "text", add_bos=False), bare, single())


@pytest.mark.parametrize("state", [{}, {"step": -1}, {"step": "3"}, {"step": 1, "epoch": 0}, None])
def test_bad_state(text_file, tokenizer, state):
    it = DataIterator(config(text_file, "text"), tokenizer, single())
    with pytest.raises(DataError, match="data iterator state"):
        it.restore(state)
