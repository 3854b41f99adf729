"""benchmarks/ablations.py end to end at a toy size: `run`, then `report`."""

import importlib.util
import json
import lzma
import pathlib
import types

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

    check_rebuilt_from_log(capsys, printed, records, data, tmp_path)

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


def check_rebuilt_from_log(capsys, printed, records, data, tmp_path):
    """`from-log` on the output `run` printed gives back its records: the
    same fields, the curve to the log's 4 decimals and whole seconds."""
    log = tmp_path / "run.log"
    log.write_text(printed)
    first = records[0]
    rebuilt_dir = tmp_path / "rebuilt"
    script(capsys, "from-log", str(log), "--out", str(rebuilt_dir),
           "--data", str(data), "--backend", first["backend"], "--device",
           first["device"], "--commit", first["commit"], "--date",
           first["date"], *TOY)
    rebuilt = [json.loads(line) for line in
               (rebuilt_dir / "runs.jsonl").read_text().splitlines()]
    assert len(rebuilt) == len(records)
    for record, copy in zip(records, rebuilt):
        assert copy["rebuilt_from_log"] is True
        assert copy["log_file"] == "run.log"
        assert "4 decimals" in copy["curve_precision"]
        # The learned spans are not in the log; the statistics file is
        # not in the rebuilt record's folder.
        assert copy["spans"] is None and "stats_file" not in copy
        exact = set(record) - {"curve", "spans", "stats_file", "date"}
        assert {k: copy[k] for k in exact} == {k: record[k] for k in exact}
        assert copy["date"] == first["date"]  # as given
        assert [p["step"] for p in copy["curve"]] == [
            p["step"] for p in record["curve"]]
        for point, original in zip(copy["curve"], record["curve"]):
            assert abs(point["valid_bits"] - original["valid_bits"]) <= 5.1e-5
        # Keras's epoch seconds (whole) hold the epoch's steps and its curve
        # scoring, which the summed step times leave out: never less than
        # the steps' time (rounding aside), and after the first epoch (the
        # scoring compiled) within a second of it at this size.
        seconds = [0] + [p["train_seconds"] for p in copy["curve"]]
        steps = [0] + [p["train_seconds"] for p in record["curve"]]
        for epoch in range(1, len(seconds)):
            epoch_seconds = seconds[epoch] - seconds[epoch - 1]
            step_seconds = steps[epoch] - steps[epoch - 1]
            assert epoch_seconds >= step_seconds - 0.5
            if epoch > 1:
                assert abs(epoch_seconds - step_seconds) <= 1.0
    # Options that do not match the runs' are refused, not guessed.
    wrong = list(TOY)
    wrong[wrong.index("--persistent") + 1] = "4"
    with pytest.raises(SystemExit, match="pass the options"):
        load_script().main(
            ["from-log", str(log), "--out", str(tmp_path / "wrong"),
             "--data", str(data), "--backend", "jax", "--device", "cpu",
             "--commit", "x", "--date", "2026-01-01", *wrong])
    # A run already in the folder is not appended twice.
    with pytest.raises(SystemExit, match="already holds"):
        script(capsys, "from-log", str(log), "--out", str(rebuilt_dir),
               "--data", str(data), "--backend", first["backend"],
               "--device", first["device"], "--commit", first["commit"],
               "--date", first["date"], *TOY)


def test_from_log_reads_a_gpu_log():
    """The committed log of the n64 run (JAX, H200): its summary, its
    epochs' cumulative seconds and curve points, the fields that follow
    from the default options, and the splits' sizes (a stand-in corpus of
    wiki-text8's sizes: 27 symbols, 5M-character splits)."""
    ablations = load_script()
    log = (ROOT / "benchmarks" / "ablations_runs" / "wiki_text8" / "logs"
           / "w_n64.log")
    (run,) = ablations.parse_log(log.read_text(), log.name)
    args = ablations.build_parser().parse_args(
        ["from-log", str(log), "--out", "unused", "--backend", "jax",
         "--device", "NVIDIA H200", "--commit", "1c7fa2b", "--date",
         "2026-11-30"])
    corpus = types.SimpleNamespace(vocabulary_size=27,
                                   valid=np.zeros(5_000_000, "int8"),
                                   test=np.zeros(5_000_000, "int8"))
    record = ablations.record_from_log(run, args, corpus, log.name,
                                       pathlib.Path("unused"))
    # Read off the log: epoch seconds 56, 42, 42, 42, 42, 28, 18, 17.
    assert [p["train_seconds"] for p in record["curve"]] == [
        56, 98, 140, 182, 224, 252, 270, 287]
    assert [p["step"] for p in record["curve"]] == list(range(250, 2001, 250))
    assert [p["valid_bits"] for p in record["curve"]][::7] == [2.8567, 2.025]
    assert record["description"] == "all-attention, N = 64"
    assert record["parameters"] == 9_014_363  # the log's and the count's
    assert (record["valid_bits"], record["test_bits"]) == (1.90166, 1.93559)
    assert record["train_seconds"] == 274.17
    assert record["persistent_memory_size"] == 64
    assert record["tokens_per_step"] == 32 * 512
    assert record["recipe"]["steps"] + record["recipe"]["final_steps"] == 2000
    assert record["valid_tokens_scored"] == record["test_tokens_scored"] == (
        4_999_999)
    assert record["curve_tokens"] == 262_144 and record["spans"] is None
    assert record["rebuilt_from_log"] is True
    # A log cut before the summary line is refused.
    cut = log.read_text().rsplit("{", 1)[0]
    with pytest.raises(SystemExit, match="has no summary line"):
        ablations.parse_log(cut, log.name)


def sweep_record(variant, n, seed, valid, **extra):
    """A record as `run` writes it, reduced to what `report` reads."""
    return {
        "variant": variant, "description": f"all-attention, N = {n}",
        "seed": seed, "corpus": "wiki-text8", "unit": "bpc",
        "preset_recipe": "text8_small", "persistent_memory_size": n,
        "feedforward_dim": None, "parameters": 1000 + n, "steps": 10,
        "train_tokens_per_s": 100, "valid_bits": valid,
        "test_bits": valid + 0.03, "eval_token_cap": None,
        "geometry": {"num_layers": 1, "hidden_dim": 8, "num_heads": 2,
                     "max_span": 8, "block_size": 4, "batch_size": 2,
                     "dropout": 0.0, "dtype": "float32"},
        "backend": "jax", "device": "cpu", "commit": "abc",
        "curve": [{"step": 10, "valid_bits": valid}], "curve_tokens": 9,
        **extra,
    }


def test_report_shows_the_n_sweep_and_rebuilt_runs(tmp_path, capsys):
    """Every N of the sweep is compared with the default N and with
    N = 0 (judged against the two-seed spreads), and runs rebuilt from
    their logs are named as such."""
    folder = tmp_path / "runs"
    folder.mkdir()
    records = [
        sweep_record("allattn", 16, 0, 1.500), sweep_record("allattn", 16, 1,
                                                            1.510),
        sweep_record("n0", 0, 0, 1.600), sweep_record("n0", 0, 1, 1.602),
        sweep_record("n4", 4, 0, 1.502, rebuilt_from_log=True,
                     log_file="w_n4.log"),
    ]
    (folder / "runs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "report"
    script(capsys, "report", "--runs", str(folder), "--out", str(out))
    table = (out / "ablations.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ")
            for line in table.splitlines() if line.startswith("| N = ")}
    # allattn 1.505 against n4 1.502: within twice the spread (0.0071).
    assert rows["N = 16 vs N = 4"][3:6] == ["+0.003", "0.007",
                                            "no difference"]
    # n4 1.502 against n0 1.601: beyond it. The spread is allattn's, the
    # largest of the sweep, not n0's 0.0014.
    assert rows["N = 4 vs N = 0"][3:6] == [
        "-0.099", "0.007", "n4 better (beyond twice the spread)"]
    assert "N = 16 vs N = 0" not in rows  # the fixed question covers it
    assert "Rebuilt from their logs" in table
    assert "n4 seed 0 (`w_n4.log`)" in table
    assert "validation and test against N" in table  # the sweep's plot


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
