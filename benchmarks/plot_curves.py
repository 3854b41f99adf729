"""Validation curves of training runs: one PNG and a RESULTS.md row per run.

Reads the `curve.json` that `examples/train_*.py --output DIR` writes (the
validation metric at every `--eval-every`, the training seconds at that
point, and the final exact validation and test figures) for each run folder
and draws the validation metric against training time (left) and steps
(right), one line per run:

    python benchmarks/plot_curves.py runs/text8_allattn runs/text8_transformer \\
        --out benchmarks/curves_text8.png --title "wiki-text8, 4 min" --record

`--record` appends one row per run to benchmarks/RESULTS.md with the card
and backend of the run (from its curve.json) and `--commit` (default: the
checkout's HEAD, which must be the commit the runs used).
"""

import argparse
import datetime
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _common import commit  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "RESULTS.md"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="folders holding curve.json")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--title", default="")
    parser.add_argument("--commit", help="the commit the runs used (default HEAD)")
    parser.add_argument("--note", default="", help="added to every row's settings")
    parser.add_argument("--record", action="store_true")
    return parser.parse_args()


def load(folder):
    path = pathlib.Path(folder) / "curve.json"
    if not path.is_file():
        raise SystemExit(f"no curve.json in {folder!r}: run the training with --output")
    run = json.loads(path.read_text())
    if not run["curve"]:
        raise SystemExit(f"{path}: the curve is empty (no --eval-every epoch ended)")
    return run


def label(run):
    result = run["result"]
    return f"{result['model']} ({result['parameters'] / 1e6:.1f}M params)"


def plot(runs, out, title):
    metric = runs[0]["metric"]
    key = f"val_{metric}"
    # Against training time too where every point has it (curve.json
    # written by the training script; curves read back from a log may not).
    timed = all("train_seconds" in p for run in runs for p in run["curve"])
    axes_x = ("train_seconds", "step") if timed else ("step",)
    fig, axes = plt.subplots(1, len(axes_x), figsize=(5.5 * len(axes_x) + 2, 4),
                             sharey=True, squeeze=False)
    axes = axes[0]
    for run in runs:
        curve = run["curve"]
        for ax, x in zip(axes, axes_x):
            ax.plot([p[x] for p in curve], [p[key] for p in curve],
                    marker=".", label=label(run))
    for ax, x in zip(axes, axes_x):
        ax.set_xlabel("training time (s, compilation and validation excluded)"
                      if x == "train_seconds" else "optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
        if metric == "perplexity":
            ax.set_yscale("log")
    axes[0].set_ylabel(f"validation {metric.replace('_', ' ')}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def record(runs, out, revision, note):
    rows = []
    for run in runs:
        r = run["result"]
        metric = run["metric"]
        rows.append(
            f"| {datetime.date.today()} | training curve | {r['device']} | "
            f"{r['backend']} | {revision} | valid {r[f'valid_{metric}']} / test "
            f"{r[f'test_{metric}']} {metric.replace('_', ' ')} after {r['steps']} "
            f"steps, {r['train_seconds']} s of training, "
            f"{r['train_tokens_per_s']:,} tokens/s | {label(run)}, "
            f"{r['corpus']}, preset {r['preset']}, batch {r['global_batch_size']}"
            f"{', ' + note if note else ''}; curve `{out}` |\n"
        )
    with open(RESULTS, "a") as f:
        f.writelines(rows)


def main():
    args = parse_args()
    runs = [load(folder) for folder in args.runs]
    metrics = {run["metric"] for run in runs}
    if len(metrics) > 1:
        raise SystemExit(f"the runs report different metrics: {sorted(metrics)}")
    plot(runs, args.out, args.title)
    for run in runs:
        print(json.dumps(run["result"]))
    if args.record:
        record(runs, args.out, args.commit or commit(), args.note)


if __name__ == "__main__":
    main()
