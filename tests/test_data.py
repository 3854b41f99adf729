"""Tests of keras_allattn.data: corpora, stream batching, full evaluation."""

import concurrent.futures
import hashlib
import io
import lzma
import math
import os
import pathlib
import re
import zipfile

import keras
import numpy as np
import pytest

from keras_allattn.data import Corpus
from keras_allattn.data import ResetMemoryOnRestart
from keras_allattn.data import StreamBatcher
from keras_allattn.data import StreamDataset
from keras_allattn.data import evaluate_stream
from keras_allattn.data import load_enwik8
from keras_allattn.data import load_ptb
from keras_allattn.data import load_text8
from keras_allattn.data import load_wikitext103
from keras_allattn.data import corpora


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def write_xz(path, data):
    return write(path, lzma.compress(data))


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def python_words(data):
    """The reference tokenisation: text-mode lines, `line.split()`, `<eos>`."""
    words = []
    for line in io.TextIOWrapper(
        io.BytesIO(data), encoding="utf-8", newline=None
    ):
        words += line.split() + ["<eos>"]
    return words


@pytest.fixture
def small_character_corpus(monkeypatch):
    """Shrinks the canonical 10^8-byte layout to 100 bytes (90/5/5)."""
    monkeypatch.setattr(corpora, "CHARACTER_CORPUS_SIZE", 100)
    monkeypatch.setattr(corpora, "CHARACTER_SPLIT_SIZES", (90, 5, 5))


# === Character-level corpora ===


def test_text8_canonical_file_and_zip_split_90_5_5(
    tmp_path, small_character_corpus
):
    rng = np.random.default_rng(0)
    text = "".join(
        rng.choice(list(" abcdefghijklmnopqrstuvwxyz"), 100)
    ).encode()
    raw = write(tmp_path / "text8", text)
    archive = str(tmp_path / "text8.zip")
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("text8", text)
    for path in (raw, archive):
        # Not the canonical files: checked against their own SHA-256.
        corpus = load_text8(path, sha256=sha256_of(path))
        assert corpus.vocabulary == list(" abcdefghijklmnopqrstuvwxyz")
        assert corpus.vocabulary_size == 27
        assert corpus.train.dtype == np.int32
        assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (
            90,
            5,
            5,
        )
        joined = corpus.decode(
            np.concatenate([corpus.train, corpus.valid, corpus.test])
        )
        assert joined == text.decode()
        expected = [
            " abcdefghijklmnopqrstuvwxyz".index(c) for c in text[90:95].decode()
        ]
        assert corpus.valid.tolist() == expected


def test_text8_rejects_wrong_size_and_foreign_characters(tmp_path):
    short = write(tmp_path / "text8", b"abc def")
    message = f"{short} is not the canonical text8 file: it must hold exactly 100,000,000 bytes, but holds 7"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_text8(short)
    archive = str(tmp_path / "other.zip")
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "x")
    with pytest.raises(
        ValueError, match="must hold exactly one file named text8"
    ):
        load_text8(archive, sha256=sha256_of(archive))
    folder = tmp_path / "folder"
    write(folder / "train.txt", b"abc def")
    write(folder / "valid.txt", b"abc")
    write(folder / "test.txt", b"ab,c")
    with pytest.raises(
        ValueError,
        match=r"test.txt is not text8-style text: byte b',' at offset 2",
    ):
        load_text8(str(folder))


def test_character_folders_plain_and_xz(tmp_path):
    folder = tmp_path / "chars"
    write_xz(folder / "train.txt.xz", b"hello world")
    write(folder / "valid.txt", b"low")
    write_xz(folder / "test.txt.xz", b"")
    corpus = load_text8(str(folder))
    assert corpus.decode(corpus.train) == "hello world"
    assert corpus.valid.tolist() == [12, 15, 23]
    assert corpus.test.shape == (0,)
    data = bytes(range(256)) + "é\n".encode()
    write_xz(tmp_path / "bytes" / "train.txt.xz", data)
    write(tmp_path / "bytes" / "valid.txt", b"\x00\xff")
    write(tmp_path / "bytes" / "test.txt", b"A")
    corpus = load_enwik8(str(tmp_path / "bytes"))
    assert corpus.train.tolist() == list(data)
    assert corpus.valid.tolist() == [0, 255] and corpus.test.tolist() == [65]
    assert corpus.vocabulary_size == 256 and corpus.vocabulary[65] == b"A"
    assert corpus.decode(corpus.train[-3:]) == "é\n"


def test_enwik8_canonical_file_and_zip(tmp_path, small_character_corpus):
    data = (
        np.random.default_rng(1).integers(0, 256, 100, dtype=np.uint8).tobytes()
    )
    raw = write(tmp_path / "enwik8", data)
    archive = str(tmp_path / "enwik8.zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", data)
    for path in (raw, archive):
        corpus = load_enwik8(path, sha256=sha256_of(path))
        assert corpus.train.tolist() == list(data[:90])
        assert corpus.valid.tolist() == list(data[90:95])
        assert corpus.test.tolist() == list(data[95:])


def test_folder_errors_name_the_path(tmp_path):
    folder = tmp_path / "partial"
    write(folder / "train.txt", b"ab")
    write(folder / "valid.txt", b"ab")
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"No test split in folder {folder}")
    ):
        load_enwik8(str(folder))
    write(folder / "test.txt", b"ab")
    write(folder / "test.txt.xz", lzma.compress(b"ab"))
    with pytest.raises(ValueError, match="several files for the test split"):
        load_enwik8(str(folder))
    os.remove(folder / "test.txt.xz")
    write(folder / "test.txt.xz.bak", b"")
    assert load_enwik8(str(folder)).test.tolist() == [97, 98]
    with pytest.raises(FileNotFoundError, match="No such file or folder"):
        load_text8(str(tmp_path / "missing"))
    broken = tmp_path / "broken"
    write(broken / "train.txt.xz", b"not xz at all")
    write(broken / "valid.txt", b"a")
    write(broken / "test.txt", b"a")
    with pytest.raises(
        ValueError, match=r"train.txt.xz is not a valid xz file"
    ):
        load_enwik8(str(broken))


def test_enwik8_loader_rejects_the_real_enwik8_prefix(tmp_path, data_dir):
    head = lzma.open(data_dir / "enwik8-head" / "enwik8-head.txt.xz").read()
    path = write(tmp_path / "enwik8", head)
    with pytest.raises(ValueError, match="holds 4,154,399"):
        load_enwik8(path)


@pytest.mark.parametrize(
    "name, loader, size",
    [("wiki-text8", load_text8, 27), ("wiki-bytes", load_enwik8, 256)],
)
def test_character_loaders_on_shared_stand_ins(
    tmp_path, data_dir, name, loader, size
):
    # The 90 MB train split is too slow for a unit test: stand the valid
    # split in for train.
    folder = tmp_path / name
    folder.mkdir()
    for split, source in (
        ("train", "valid"),
        ("valid", "valid"),
        ("test", "test"),
    ):
        os.symlink(
            data_dir / name / f"{source}.txt.xz", folder / f"{split}.txt.xz"
        )
    corpus = loader(str(folder))
    assert corpus.vocabulary_size == size
    assert (
        len(corpus.train) == len(corpus.valid) == len(corpus.test) == 5_000_000
    )
    np.testing.assert_array_equal(corpus.train, corpus.valid)
    text = lzma.open(data_dir / name / "test.txt.xz").read()
    assert corpus.decode(corpus.test[:1000]) == text[:1000].decode(
        "utf-8", errors="replace"
    )
    assert corpus.train.min() >= 0 and corpus.train.max() < size


# === Word-level corpora ===


def test_word_tokens_match_python_text_mode_split(tmp_path):
    train = (
        "the cat\u00a0sat\r\non the mat\rthe end\x1cof it\n\n   \n"
        "wide\u3000space and\u2009thin <eos> literal\nno newline at the end"
    ).encode()
    folder = tmp_path / "words"
    write(folder / "train.txt", train)
    write(folder / "valid.txt", b"the mat\n")
    write(folder / "test.txt", b"cat")
    corpus = load_ptb(str(folder))
    words = python_words(train)
    assert [corpus.vocabulary[i] for i in corpus.train] == words
    assert corpus.decode(corpus.valid) == "the mat <eos>"
    assert corpus.decode(corpus.test) == "cat <eos>"
    counts = {w: words.count(w) for w in words}
    first = {w: words.index(w) for w in reversed(words)}
    expected = sorted(counts, key=lambda w: (-counts[w], first[w]))
    assert corpus.vocabulary == expected
    assert corpus.vocabulary[:2] == ["<eos>", "the"]


def test_word_unknowns_error_without_unk_and_map_with_it(tmp_path):
    folder = tmp_path / "words"
    write(folder / "train.txt", b"a b a\n")
    write(folder / "valid.txt", b"a zebra\n")
    write(folder / "test.txt", b"b\n")
    with pytest.raises(
        ValueError,
        match=r"valid.txt holds words missing from the training vocabulary, e.g. \['zebra'\]",
    ):
        load_ptb(str(folder))
    write(folder / "train.txt", b"a b a <unk>\n")
    corpus = load_ptb(str(folder))
    assert corpus.decode(corpus.valid) == "a <unk> <eos>"


def test_word_files_must_be_utf8(tmp_path):
    folder = tmp_path / "words"
    write(folder / "train.txt", b"fine\nbad \xff byte\n")
    write(folder / "valid.txt", b"fine\n")
    write(folder / "test.txt", b"fine\n")
    with pytest.raises(
        ValueError,
        match=r"train.txt is not valid UTF-8: invalid start byte at byte 9",
    ):
        load_ptb(str(folder))


def test_wikitext103_zip_and_folder_names(tmp_path):
    splits = {
        "train": b" = Title = \n\n a b c a\n",
        "valid": b" a b\n",
        "test": b" c\n",
    }
    archive = str(tmp_path / "wikitext-103-v1.zip")
    with zipfile.ZipFile(archive, "w") as z:
        for split, data in splits.items():
            z.writestr(f"wikitext-103/wiki.{split}.tokens", data)
    folder = tmp_path / "wikitext-103"
    for split, data in splits.items():
        write(folder / f"wiki.{split}.tokens", data)
    for path, sha256 in ((archive, sha256_of(archive)), (str(folder), None)):
        corpus = load_wikitext103(path, sha256=sha256)
        assert [corpus.vocabulary[i] for i in corpus.train] == python_words(
            splits["train"]
        )
        assert corpus.decode(corpus.valid) == "a b <eos>"
        assert corpus.vocabulary[0] == "<eos>"
    single = write(tmp_path / "wiki.train.tokens", splits["train"])
    with pytest.raises(
        ValueError, match=re.escape(f"Received: path={single!r}")
    ):
        load_wikitext103(single)
    with pytest.raises(ValueError, match="must be a folder"):
        load_ptb(archive)


def test_ptb_standard_counts_on_shared_copy(data_dir):
    corpus = load_ptb(data_dir / "ptb")
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (
        929_589,
        73_760,
        82_430,
    )
    assert corpus.vocabulary_size == 10_000
    assert corpus.vocabulary[0] == "the"
    assert {"<unk>", "<eos>", "N"} <= set(corpus.vocabulary[:5])
    valid = lzma.open(data_dir / "ptb" / "valid.txt.xz").read()
    assert [corpus.vocabulary[i] for i in corpus.valid] == python_words(valid)


def test_ptb_download_path_uses_sha256_checked_cache(tmp_path, data_dir):
    # A cache holding the canonical files: their SHA-256 passes and nothing
    # is downloaded.
    for split in ("train", "valid", "test"):
        data = lzma.open(data_dir / "ptb" / f"{split}.txt.xz").read()
        write(tmp_path / "datasets" / f"ptb.{split}.txt", data)
    corpus = load_ptb(cache_dir=str(tmp_path))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (
        929_589,
        73_760,
        82_430,
    )


def test_corpus_decode_rejects_bad_ids():
    corpus = Corpus(
        "x",
        "word",
        np.zeros(1, np.int32),
        np.zeros(1, np.int32),
        np.zeros(1, np.int32),
        ["a", "b"],
    )
    assert corpus.decode([1, 0]) == "b a"
    with pytest.raises(
        ValueError,
        match=r"`ids` must lie in \[0, vocabulary_size=2\). Received: ids with range \[0, 2\]",
    ):
        corpus.decode([0, 2])
    with pytest.raises(ValueError, match="`ids` must be 1-D"):
        corpus.decode([[0]])


# === Corpus file checks ===


def test_canonical_files_have_published_digests_and_https_addresses():
    files = [
        corpora.TEXT8_ZIP, corpora.TEXT8_FILE, corpora.ENWIK8_ZIP,
        corpora.ENWIK8_FILE, corpora.WIKITEXT103_ZIP,
        *corpora.PTB_FILES.values(),
    ]
    for file in files:
        assert file.url.startswith("https://"), file
        length = {"sha256": 64, "md5": 32}[file.algorithm]
        assert len(file.digest) == length and int(file.digest, 16) >= 0
    # Every downloaded archive is checked with SHA-256.
    for file in (corpora.TEXT8_ZIP, corpora.ENWIK8_ZIP,
                 corpora.WIKITEXT103_ZIP, *corpora.PTB_FILES.values()):
        assert file.algorithm == "sha256", file


def test_ptb_published_sha256_matches_the_shared_copy(tmp_path, data_dir):
    """The shared PTB files (MD5s of the canonical ones) pass the SHA-256
    check, downloaded from a mirror given by `url=`."""
    mirror = tmp_path / "mirror"
    for split in ("train", "valid", "test"):
        write(mirror / f"ptb.{split}.txt",
              lzma.open(data_dir / "ptb" / f"{split}.txt.xz").read())
    corpus = load_ptb(url=mirror.as_uri() + "/", cache_dir=str(tmp_path))
    assert len(corpus.valid) == 73_760
    # The same files in a folder under their canonical names are checked.
    assert len(load_ptb(str(mirror)).test) == 82_430
    data = bytearray((mirror / "ptb.test.txt").read_bytes())
    data[100] ^= 1
    (mirror / "ptb.test.txt").write_bytes(bytes(data))
    path = str(mirror / "ptb.test.txt")
    with pytest.raises(ValueError) as error:
        load_ptb(str(mirror))
    message = str(error.value)
    assert message.startswith(f"{path} is not the expected ptb.test.txt")
    assert corpora.PTB_FILES["test"].digest in message
    assert "Delete it and download it again" in message


def test_download_is_sha256_checked_and_a_bad_one_deleted(tmp_path):
    fake = write(tmp_path / "mirror" / "text8.zip", b"not the archive")
    cache = tmp_path / "cache"
    cache.mkdir()
    with pytest.raises(ValueError) as error:
        load_text8(url=pathlib.Path(fake).as_uri(), cache_dir=str(cache))
    target = str(cache / "datasets" / "text8.zip")
    message = str(error.value)
    assert message.startswith(f"{target}, downloaded from {pathlib.Path(fake).as_uri()}")
    assert "it holds 15 bytes instead of 31,344,016" in message
    assert "pass `url=` another mirror of text8.zip" in message
    assert not os.path.exists(target)
    # With the SHA-256 of one's own copy, the same address is accepted up
    # to the content check.
    with pytest.raises(ValueError, match="not a readable zip archive"):
        load_text8(url=pathlib.Path(fake).as_uri(), sha256=sha256_of(fake),
                   cache_dir=str(cache))


def test_damaged_cached_download_is_fetched_again(tmp_path, data_dir):
    mirror = tmp_path / "mirror"
    for split in ("train", "valid", "test"):
        write(mirror / f"ptb.{split}.txt",
              lzma.open(data_dir / "ptb" / f"{split}.txt.xz").read())
    cached = write(tmp_path / "datasets" / "ptb.valid.txt", b"cut sho")
    corpus = load_ptb(url=mirror.as_uri() + "/", cache_dir=str(tmp_path))
    assert len(corpus.valid) == 73_760
    assert sha256_of(cached) == corpora.PTB_FILES["valid"].digest


@pytest.mark.parametrize("loader", [load_text8, load_enwik8, load_wikitext103])
def test_local_archive_is_checked_against_the_canonical_sha256(
    tmp_path, loader
):
    name = {load_text8: "text8.zip", load_enwik8: "enwik8.zip",
            load_wikitext103: "wikitext-103-v1.zip"}[loader]
    archive = str(tmp_path / name)
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("member", b"abc")
    with pytest.raises(ValueError) as error:
        loader(archive)
    message = str(error.value)
    assert message.startswith(f"{archive} is not the expected {name}")
    assert "or pass `path=` the location of a good copy" in message
    with pytest.raises(ValueError, match=re.escape("`sha256` must be None or")):
        loader(archive, sha256="abc")


def test_damaged_files_name_themselves(tmp_path, small_character_corpus):
    # A cut .xz file.
    folder = tmp_path / "cut"
    write(folder / "train.txt.xz", lzma.compress(b"abc" * 1000)[:-20])
    write(folder / "valid.txt", b"a")
    write(folder / "test.txt", b"a")
    cut = str(folder / "train.txt.xz")
    with pytest.raises(
        ValueError, match=re.escape(f"{cut} is not a valid xz file")
    ):
        load_text8(str(folder))
    # A zip whose member fails its CRC.
    text = b"ab cd" * 20
    archive = str(tmp_path / "text8.zip")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("text8", text)
    data = bytearray(open(archive, "rb").read())
    data[data.index(text) + 7] ^= 1
    open(archive, "wb").write(bytes(data))
    with pytest.raises(ValueError) as error:
        load_text8(archive, sha256=sha256_of(archive))
    message = str(error.value)
    assert message.startswith(f"Zip archive {archive} is damaged")
    assert "CRC" in message and "Delete it" in message
    # A cut WikiText archive: its hash fails first; with its own hash, it is
    # named as an unreadable zip.
    wiki = str(tmp_path / "wikitext-103-v1.zip")
    with zipfile.ZipFile(wiki, "w") as z:
        for split in ("train", "valid", "test"):
            z.writestr(f"wikitext-103/wiki.{split}.tokens", b" a b\n" * 50)
    open(wiki, "r+b").truncate(os.path.getsize(wiki) // 2)
    with pytest.raises(
        ValueError, match=re.escape(f"{wiki} is not the expected")
    ):
        load_wikitext103(wiki)
    with pytest.raises(
        ValueError, match=re.escape(f"{wiki} is not a readable zip archive")
    ):
        load_wikitext103(wiki, sha256=sha256_of(wiki))


# === Stream batching ===


def reference_positions(batcher, num_steps):
    """The reference's training loop: (position, reset before this batch)."""
    out, position, pass_index, reset = [], 0, 0, True
    limit = batcher.stream_length - batcher.block_size
    for _ in range(num_steps):
        out.append((position, reset))
        reset = False
        position += batcher.block_size
        if position >= limit:
            pass_index += 1
            position = batcher.pass_offset(pass_index)
            reset = True
    return out


def test_stream_batches_follow_the_reference_loop():
    tokens = np.arange(2 * 103 + 1, dtype=np.int32)
    batcher = StreamBatcher(tokens, batch_size=2, block_size=7, seed=5)
    assert batcher.stream_length == 103 and batcher.dropped_tokens == 1
    assert np.shares_memory(batcher.streams, tokens)
    steps = 200
    expected = reference_positions(batcher, steps)
    resets = []
    for step, (inputs, targets, reset) in enumerate(batcher.iterate(steps)):
        position, expected_reset = expected[step]
        assert batcher.locate(step)[1] == position
        assert reset == expected_reset == batcher.is_pass_start(step)
        rows = np.arange(2)[:, None] * 103 + position + np.arange(7)
        np.testing.assert_array_equal(inputs, rows)
        np.testing.assert_array_equal(targets, rows + 1)
        assert inputs.dtype == targets.dtype == np.int32
        assert inputs.flags.c_contiguous and targets.flags.c_contiguous
        assert position + 7 + 1 <= 103
        if reset:
            resets.append(step)
    np.testing.assert_array_equal(batcher.memory_reset_steps(steps), resets)
    assert len(resets) > 10
    offsets = [batcher.pass_offset(p) for p in range(len(resets))]
    assert offsets[0] == 0 and all(0 <= o < 7 for o in offsets)
    assert len(set(offsets[1:])) > 1


def test_stream_rows_are_contiguous_across_batches():
    tokens = np.random.default_rng(0).integers(0, 50, 4 * 60).astype(np.int64)
    batcher = StreamBatcher(tokens, batch_size=4, block_size=5, seed=0)
    first_pass = batcher.batches_in_pass(0)
    inputs = np.concatenate(
        [batcher.batch(s)[0] for s in range(first_pass)], axis=1
    )
    targets = np.concatenate(
        [batcher.batch(s)[1] for s in range(first_pass)], axis=1
    )
    streams = tokens.reshape(4, 60)
    np.testing.assert_array_equal(inputs, streams[:, : 5 * first_pass])
    np.testing.assert_array_equal(targets, streams[:, 1 : 5 * first_pass + 1])
    assert batcher.batches_in_pass(0) == (60 - 1) // 5


def test_stream_batcher_is_consistent_across_threads():
    tokens = np.arange(3 * 500)
    sequential = StreamBatcher(tokens, 3, 4, seed=7)
    expected = [sequential.locate(s) for s in range(3000)]
    shared = StreamBatcher(tokens, 3, 4, seed=7)
    order = np.random.default_rng(0).permutation(3000).tolist()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        found = dict(zip(order, pool.map(shared.locate, order)))
    assert [found[s] for s in range(3000)] == expected


def test_stream_seed_makes_offsets_reproducible():
    tokens = np.arange(1000)
    a = StreamBatcher(tokens, 2, 16, seed=3)
    b = StreamBatcher(tokens, 2, 16, seed=3)
    c = StreamBatcher(tokens, 2, 16, seed=4)
    offsets = lambda x: [x.pass_offset(p) for p in range(40)]
    assert offsets(a) == offsets(b) != offsets(c)
    drawn = StreamBatcher(tokens, 2, 16)
    assert StreamBatcher(tokens, 2, 16, seed=drawn.seed).memory_reset_steps(
        500
    ).tolist() == (drawn.memory_reset_steps(500).tolist())


@pytest.mark.parametrize(
    "tokens, kwargs, message",
    [
        (
            np.arange(100),
            {"batch_size": 0, "block_size": 4},
            "`batch_size` must be a positive integer. Received: batch_size=0",
        ),
        (
            np.arange(100),
            {"batch_size": 2, "block_size": -1},
            "`block_size` must be a positive integer. Received: block_size=-1",
        ),
        (
            np.arange(100),
            {"batch_size": 2, "block_size": 26},
            "`tokens` is too short",
        ),
        (
            np.arange(100).reshape(10, 10),
            {"batch_size": 2, "block_size": 2},
            "`tokens` must be a 1-D array of token ids",
        ),
        (
            np.linspace(0, 1, 100),
            {"batch_size": 2, "block_size": 2},
            "`tokens` must hold integer token ids",
        ),
        (
            np.arange(100) - 1,
            {"batch_size": 2, "block_size": 2},
            "`tokens` must hold token ids in [0, 2**31). Received: tokens[0]=-1",
        ),
        (
            np.arange(100),
            {"batch_size": 2, "block_size": 2, "seed": -1},
            "`seed` must be a non-negative integer",
        ),
    ],
)
def test_stream_batcher_rejects_bad_arguments(tokens, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        StreamBatcher(tokens, **kwargs)


def test_stream_dataset_items_and_errors():
    batcher = StreamBatcher(np.arange(400), 4, 8, seed=1)
    dataset = batcher.as_dataset(start_step=30)
    assert isinstance(dataset, StreamDataset)
    assert isinstance(dataset, keras.utils.PyDataset)
    assert dataset.num_batches is None
    for i in (0, 1, 17):
        for got, want in zip(dataset[i], batcher.batch(30 + i)):
            np.testing.assert_array_equal(got, want)
    with pytest.raises(
        ValueError, match="`start_step` must be a non-negative integer"
    ):
        batcher.as_dataset(start_step=-1)
    with pytest.raises(
        ValueError,
        match="`step` must be a non-negative integer. Received: step=-2",
    ):
        batcher.batch(-2)
    with pytest.raises(
        ValueError, match="`stream` must be a StreamDataset or a StreamBatcher"
    ):
        ResetMemoryOnRestart(np.arange(3))


class TokenSum(keras.layers.Layer):
    """A segment memory stand-in: the sum of the input tokens since reset."""

    def build(self, input_shape):
        self.total = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="total"
        )

    def call(self, tokens):
        self.total.assign_add(keras.ops.sum(keras.ops.cast(tokens, "float32")))
        return tokens


class ToyLM(keras.Model):
    def __init__(self, vocabulary, **kwargs):
        super().__init__(**kwargs)
        self.memory = TokenSum()
        self.embedding = keras.layers.Embedding(vocabulary, 4)
        self.head = keras.layers.Dense(vocabulary)

    def call(self, tokens):
        return self.head(self.embedding(self.memory(tokens)))

    def reset_memory(self):
        self.memory.total.assign(0.0)


def test_reset_memory_callback_in_fit_across_epochs():
    tokens = np.random.default_rng(2).integers(0, 20, 2 * 37).astype(np.int32)
    batcher = StreamBatcher(tokens, batch_size=2, block_size=4, seed=9)
    steps_per_epoch, epochs, start = 3, 3, 2
    total_steps = start + steps_per_epoch * epochs
    resets = batcher.memory_reset_steps(total_steps)
    # Pass starts fall inside the run, and not on epoch boundaries only.
    assert any(
        start < r < total_steps and (r - start) % steps_per_epoch
        for r in resets
    )
    dataset = batcher.as_dataset(start_step=start)
    model = ToyLM(20)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(
        dataset,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        callbacks=[ResetMemoryOnRestart(dataset)],
        shuffle=False,
        verbose=0,
    )
    last_reset = resets[resets < total_steps].max()
    expected = sum(
        batcher.batch(s)[0].sum() for s in range(last_reset, total_steps)
    )
    without_reset = sum(
        batcher.batch(s)[0].sum() for s in range(start, total_steps)
    )
    assert expected != without_reset
    assert float(keras.ops.convert_to_numpy(model.memory.total)) == expected


def test_reset_memory_callback_needs_a_reset_memory_method():
    batcher = StreamBatcher(np.arange(64), 2, 4, seed=0)
    model = keras.Sequential(
        [keras.Input((4,), dtype="int32"), keras.layers.Embedding(64, 64)]
    )
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    with pytest.raises(
        ValueError, match="needs a model with a `reset_memory\\(\\)` method"
    ):
        model.fit(
            batcher.as_dataset(),
            steps_per_epoch=1,
            callbacks=[ResetMemoryOnRestart(batcher)],
            shuffle=False,
            verbose=0,
        )


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="the torch backend itself refuses steps_per_execution > 1",
)
def test_reset_memory_callback_refuses_several_steps_per_execution():
    batcher = StreamBatcher(np.arange(64), 2, 4, seed=0)
    toy = ToyLM(64)
    toy.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        steps_per_execution=2,
    )
    with pytest.raises(
        ValueError,
        match="needs steps_per_execution=1. Received: steps_per_execution=2",
    ):
        toy.fit(
            batcher.as_dataset(),
            steps_per_epoch=2,
            callbacks=[ResetMemoryOnRestart(batcher)],
            shuffle=False,
            verbose=0,
        )


# === Full evaluation ===


class BigramCounter:
    """A numpy 'model' whose memory is the bigram counts of its stream.

    Memories: counts `(B, V, V)` of (previous, next) pairs seen, the last
    token `(B, 1)` (-1 at a stream's start) and the number of tokens seen
    `(B, 1)`. The logits for the token after `x` are `log(1 + counts[x])`.
    Every call's inputs are recorded.
    """

    def __init__(self, vocabulary, block_size=None):
        self.vocabulary = vocabulary
        if block_size is not None:
            self.block_size = block_size
        self.calls = []

    def initial_memories(self, batch_size):
        v = self.vocabulary
        return [
            np.zeros((batch_size, v, v)),
            np.full((batch_size, 1), -1),
            np.zeros((batch_size, 1)),
        ]

    def call_with_memory(self, tokens, memories):
        tokens = keras.ops.convert_to_numpy(tokens)
        counts, last, seen = (np.array(m) for m in memories)
        self.calls.append(tokens)
        logits = np.zeros(tokens.shape + (self.vocabulary,), np.float32)
        for b in range(tokens.shape[0]):
            for t, token in enumerate(tokens[b]):
                if last[b, 0] >= 0:
                    counts[b, last[b, 0], token] += 1
                logits[b, t] = np.log1p(counts[b, token])
                last[b, 0] = token
        seen += tokens.shape[1]
        return keras.ops.convert_to_tensor(logits), [counts, last, seen]


def direct_bigram_nll(stream, vocabulary):
    """Per-token loop over one stream (inputs followed by their last target)."""
    counts = np.zeros((vocabulary, vocabulary))
    nll = []
    for t in range(len(stream) - 1):
        if t > 0:
            counts[stream[t - 1], stream[t]] += 1
        log_p = np.log1p(counts[stream[t]]) - np.log(
            np.exp(np.log1p(counts[stream[t]])).sum()
        )
        nll.append(-log_p[stream[t + 1]])
    return nll


@pytest.mark.parametrize(
    "length, batch_size, block_size",
    [(101, 4, 8), (97, 4, 8), (81, 4, 5), (6, 8, 3), (50, 1, 64), (2, 1, 1)],
)
def test_evaluate_stream_scores_every_token_once(
    length, batch_size, block_size
):
    vocabulary = 5
    tokens = np.random.default_rng(length).integers(0, vocabulary, length)
    model = BigramCounter(vocabulary)
    result = evaluate_stream(
        model, tokens, batch_size=batch_size, block_size=block_size
    )

    pairs = length - 1
    rows = pairs // batch_size
    assert result["tokens"] == pairs
    # The inputs seen: whole rows block by block, then the tail as one row.
    row_call_count = -(-rows // block_size)
    row_calls, tail_calls = (
        model.calls[:row_call_count],
        model.calls[row_call_count:],
    )
    assert all(c.shape[1] <= block_size for c in model.calls)
    assert all(c.shape[0] == batch_size for c in row_calls)
    assert all(c.shape[0] == 1 for c in tail_calls)
    if rows:
        np.testing.assert_array_equal(
            np.concatenate(row_calls, axis=1),
            tokens[: batch_size * rows].reshape(batch_size, rows),
        )
    seen_tail = np.concatenate([c[0] for c in tail_calls]) if tail_calls else []
    np.testing.assert_array_equal(seen_tail, tokens[batch_size * rows : pairs])

    # Direct computation: row r is the stream tokens[r*rows : (r+1)*rows + 1],
    # and the last row continues through the tail to the end of the split.
    nll = []
    for r in range(batch_size):
        end = (r + 1) * rows + 1 if r < batch_size - 1 else length
        if end - r * rows >= 2:
            nll += direct_bigram_nll(tokens[r * rows : end], vocabulary)
    assert len(nll) == pairs
    loss = np.mean(nll)
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["bits_per_token"] == pytest.approx(
        loss / math.log(2), rel=1e-6
    )
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-6)


def test_evaluate_stream_reads_block_size_and_checks_arguments():
    tokens = np.random.default_rng(0).integers(0, 3, 40)
    with_block = BigramCounter(3, block_size=4)
    result = evaluate_stream(with_block, tokens, batch_size=2)
    # 39 pairs: rows of 19 in blocks of 4, 4, 4, 4, 3, then a tail of one.
    assert [c.shape for c in with_block.calls] == [(2, 4)] * 4 + [
        (2, 3),
        (1, 1),
    ]
    assert result == evaluate_stream(
        BigramCounter(3), tokens, batch_size=2, block_size=4
    )
    with pytest.raises(
        ValueError,
        match="`block_size` must be given when the model has no `block_size` attribute",
    ):
        evaluate_stream(BigramCounter(3), tokens)
    with pytest.raises(
        ValueError,
        match="`batch_size` must be a positive integer. Received: batch_size=0",
    ):
        evaluate_stream(with_block, tokens, batch_size=0)
    with pytest.raises(
        ValueError, match="`tokens` must hold at least 2 tokens"
    ):
        evaluate_stream(with_block, tokens[:1])
    with pytest.raises(
        ValueError,
        match=re.escape(
            "`tokens` must hold token ids in [0, vocabulary_size=3). "
            "Received: tokens[3]=5"
        ),
    ):
        evaluate_stream(with_block, np.array([0, 1, 2, 5]), batch_size=1)
    # A model without `vocabulary_size`: every id, inputs included, is
    # checked against the width of its first logits.
    with pytest.raises(ValueError, match=re.escape("Received: tokens[4]=3")):
        evaluate_stream(with_block, np.array([0, 1, 2, 0, 3, 1]), batch_size=1)

    class WrongShape(BigramCounter):
        def call_with_memory(self, tokens, memories):
            logits, memories = super().call_with_memory(tokens, memories)
            return logits[:, :-1], memories

    with pytest.raises(
        ValueError,
        match=r"must return logits of shape \(batch, length, vocabulary\)",
    ):
        evaluate_stream(WrongShape(3, block_size=4), tokens, batch_size=2)


def test_evaluate_stream_compiled_matches_eager_calls():
    """A Keras model goes through the compiled scorer: same numbers as
    calling `call_with_memory` block by block eagerly."""
    from keras_allattn import AllAttentionLM

    model = AllAttentionLM(
        vocabulary_size=11, num_layers=2, hidden_dim=16, num_heads=2,
        persistent_memory_size=4, max_span=12, block_size=5, batch_size=2,
        span_ramp=4,
    )
    tokens = np.random.default_rng(3).integers(0, 11, 38)
    result = evaluate_stream(model, tokens, batch_size=2)
    # 37 pairs: rows of 18 in blocks 5, 5, 5, 3, then a tail of one token.
    inputs, targets = tokens[:-1], tokens[1:]
    rows_in, rows_out = inputs[:36].reshape(2, 18), targets[:36].reshape(2, 18)
    memories, nll = model.initial_memories(2), []
    for start in range(0, 18, 5):
        logits, memories = model.call_with_memory(
            keras.ops.convert_to_tensor(rows_in[:, start : start + 5], "int32"),
            memories,
        )
        logits = keras.ops.convert_to_numpy(logits).astype(np.float64)
        picked = np.take_along_axis(logits, rows_out[:, start : start + 5, None], -1)
        top = logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top
        nll.append((log_z - picked).ravel())
    logits, _ = model.call_with_memory(
        keras.ops.convert_to_tensor(inputs[None, 36:], "int32"),
        [m[-1:] for m in memories],
    )
    logits = keras.ops.convert_to_numpy(logits).astype(np.float64)[0, 0]
    nll.append([np.log(np.exp(logits - logits.max()).sum()) + logits.max()
                - logits[targets[36]]])
    expected = np.mean(np.concatenate(nll))
    assert result["tokens"] == 37
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
