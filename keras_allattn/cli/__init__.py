"""The `keras-allattn` command, installed with the package.

    keras-allattn train [--corpus text8|enwik8|ptb|wikitext103] [flags]
    keras-allattn generate --checkpoint model.keras [flags]
    keras-allattn export --checkpoint model.keras --output serving [flags]
    keras-allattn info

`keras-allattn COMMAND --help` lists a command's flags. `python -m
keras_allattn` runs the same command. The backend is Keras's:
`KERAS_BACKEND=jax|tensorflow|torch` (or `~/.keras/keras.json`).
"""

import argparse
import sys

__all__ = ["COMMANDS", "command_parser", "main"]

# Command -> (module, one-line help).
COMMANDS = {
    "train": (
        "keras_allattn.cli.train",
        "train on text8, enwik8, PTB or WikiText-103 with a preset's recipe",
    ),
    "generate": (
        "keras_allattn.cli.generate",
        "sample text from a trained model (a model.save() file)",
    ),
    "export": (
        "keras_allattn.cli.export",
        "export a trained model as a SavedModel for TensorFlow Serving",
    ),
    "info": (
        "keras_allattn.info",
        "show the backend, the devices and whether the fused kernels run",
    ),
}


def command_parser(prog, doc):
    """The `argparse` parser of a command: `doc`'s first line is its
    description, the rest its epilog (kept as written)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.splitlines()[0],
        epilog="\n".join(doc.splitlines()[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _usage():
    width = max(map(len, COMMANDS))
    lines = [
        "usage: keras-allattn COMMAND [flags]   (keras-allattn COMMAND --help)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help}" for name, (_, help) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None):
    """Runs `keras-allattn COMMAND ...`; returns the exit status."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(_usage(), file=sys.stderr)
        print(
            f"\nkeras-allattn: unknown command {command!r}; choose one of "
            f"{', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest, prog=f"keras-allattn {command}")
