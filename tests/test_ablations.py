"""benchmarks/ablations.py end to end at a toy size: `run`, then `report`."""

import importlib.util
import json
import lzma
import pathlib

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ablations.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# 129 tokens: 128 predictions, 8 rows of two blocks of 8, so the learning
# curve and the final scoring share one compiled shape.
EVAL_TOKENS = 129
TOY = [
    "--steps", "4", "--eval-every", "2", "--layers", "1", "--hidden-dim", "16",
    "--heads", "2", "--persistent", "8", "--max-span", "16", "--block-size",
    "8", "--batch-size", "2", "--curve-tokens", str(EVAL_TOKENS),
    "--stats-rows", "2", "--dtype", "float32",
    "--cap-eval-tokens-for-testing", str(EVAL_TOKENS),
]


def load_script():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_corpus(data_dir, folder):
    """Splits cut from the real wiki-text8 validation text (read, not kept)."""
    with lzma.open(data_dir / "wiki-text8" / "valid.txt.xz") as f:
        text = f.read(24_000)
    folder.mkdir()
    for name, part in (("train", text[:20_000]), ("valid", text[20_000:22_000]),
                       ("test", text[22_000:])):
        (folder / f"{name}.txt").write_bytes(part)
    return folder


def script(capsys, *args):
    """Runs the script's `main` here (the test process has imported Keras
    and the backend already) and returns what it printed."""
    assert load_script().main(list(args)) == 0
    return capsys.readouterr().out


def test_run_and_report_end_to_end(data_dir, tmp_path, capsys):
    data = small_corpus(data_dir, tmp_path / "data")
    runs = tmp_path / "runs"
    printed = script(capsys, "run", "--variants", "allattn,transformer",
                     "--seeds", "0", "--out", str(runs), "--data", str(data),
                     *TOY)
    assert "parameters: allattn" in printed

    records = [json.loads(line)
               for line in (runs / "runs.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in records] == ["allattn", "transformer"]
    allattn, transformer = records
    for record in records:
        assert record["steps"] == 4
        assert record["backend"] == keras.backend.backend()
        assert [p["step"] for p in record["curve"]] == [2, 4]
        assert record["valid_tokens_scored"] == EVAL_TOKENS - 1
        assert record["test_tokens_scored"] == EVAL_TOKENS - 1
        assert record["eval_token_cap"] == EVAL_TOKENS
        assert 0 < record["valid_bits"] < 8 and 0 < record["test_bits"] < 8
        assert record["train_tokens_per_s"] > 0 and record["commit"]
    # The baseline trades the persistent vectors for a feed-forward
    # sublayer with (nearly) the same parameter count.
    assert transformer["persistent_memory_size"] == 0
    assert transformer["feedforward_dim"] > 0
    assert abs(transformer["parameters"] / allattn["parameters"] - 1) < 0.01
    assert "stats_file" not in transformer

    stats = json.loads((runs / allattn["stats_file"]).read_text())
    share = np.array(stats["persistent_share"])
    assert share.shape == (1, 2) and stats["queries"] == 2 * 4 * 8
    np.testing.assert_allclose(share + np.array(stats["context_share"]), 1.0,
                               atol=1e-5)

    out = tmp_path / "report"
    script(capsys, "report", "--runs", str(runs), "--out", str(out))
    table = (out / "ablations.md").read_text()
    assert "| allattn | all-attention, N = 8" in table
    assert "| transformer | Transformer: feed-forward" in table
    assert "| all-attention vs Transformer (equal parameters) |" in table
    assert "one seed on each side" in table  # one seed: no verdict
    assert "Test runs: only the first 129 tokens" in table
    assert "1.05 / 1.11 bpc" in table  # the paper's figure for text8
    links = [line[line.index("(") + 1 : -1] for line in table.splitlines()
             if line.startswith("![")]
    assert len(links) == 4  # curves, persistent share, spans, distances
    for link in links:
        assert (out / link).read_bytes()[:8] == PNG_SIGNATURE, link


def test_report_verdicts():
    ablations = load_script()

    def runs(*values):
        return [{"valid_bits": v} for v in values]

    # Spread 0.01: a difference of 0.015 is under twice it.
    assert ablations.verdict("a", runs(1.0, 1.01414), "b",
                             runs(1.015, 1.015), "valid_bits")[2] == (
        "no difference")
    difference, spread, word = ablations.verdict(
        "a", runs(1.0, 1.01414), "b", runs(1.05, 1.05), "valid_bits")
    assert word == "a better (beyond twice the spread)"
    assert difference == pytest.approx(-0.04293) and spread == pytest.approx(
        0.01, rel=1e-3)
    assert ablations.verdict("a", runs(1.2), "b", runs(1.0, 1.0),
                             "valid_bits")[2] == "b better (beyond twice the spread)"
    assert ablations.verdict("a", runs(1.0), "b", runs(1.5),
                             "valid_bits")[2].startswith("undecided")


def test_matched_feedforward_width():
    ablations = load_script()
    # 2 N d persistent parameters against 2 d f + f + 3 d.
    assert ablations.matched_feedforward_dim(512, 1024) == 1022
    f = ablations.matched_feedforward_dim(512, 1024)
    assert abs(2 * 512 * f + f + 3 * 512 - 2 * 1024 * 512) <= 1025 / 2
    with pytest.raises(ValueError, match="Received: persistent=0"):
        ablations.matched_feedforward_dim(512, 0)


def test_enwik8_head_is_split_in_order(data_dir):
    ablations = load_script()
    args = ablations.build_parser().parse_args(
        ["run", "--variants", "allattn", "--out", "unused", "--corpus",
         "enwik8-head", "--data",
         str(data_dir / "enwik8-head" / "enwik8-head.txt.xz")])
    corpus = ablations.load_corpus(args)
    sizes = [len(corpus.train), len(corpus.valid), len(corpus.test)]
    assert sum(sizes) == 4_154_399 and corpus.vocabulary_size == 256
    assert sizes[0] == int(4_154_399 * 0.9)
    with lzma.open(data_dir / "enwik8-head" / "enwik8-head.txt.xz") as f:
        head = f.read(100)
    assert corpus.train[:100].tolist() == list(head)
