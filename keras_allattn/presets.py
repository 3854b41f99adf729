"""Model geometries and training recipes of the paper (SPEC §5).

Each preset holds the `AllAttentionLM` arguments (`model`) and the training
recipe (`recipe`: optimizer, learning rate, warm-up, clipping, steps at the
full and at a tenth of the learning rate), so that
`AllAttentionLM.from_preset(name)` and
`keras_allattn.training.optimizer_from_recipe(get_preset(name)["recipe"])`
reproduce the reference set-up. `requires` names a feature a preset needs
that the library does not provide yet; asking for such a preset raises a
clear error.
"""

import copy

_CHAR_RECIPE = {
    "optimizer": "adagrad_clip",
    "learning_rate": 0.07,
    "warmup_steps": 32_000,
    "clip": 0.03,
}

PRESETS = {
    "enwik8_small": {
        "description": "enwik8, 18 layers, d 512, 1024 persistent vectors "
        "(39M parameters; paper: 1.03 / 1.01 bpb dev / test).",
        "model": dict(
            vocabulary_size=256, num_layers=18, hidden_dim=512, num_heads=8,
            persistent_memory_size=1024, max_span=8192, block_size=512,
            batch_size=64, adaptive_span=True, span_ramp=32, span_init=0.0,
            span_loss_coeff=1e-7, dropout=0.3,
        ),
        "recipe": dict(_CHAR_RECIPE, steps=450_000, final_steps=30_000),
    },
    "enwik8_large": {
        "description": "enwik8, 36 layers, d 512, 2048 persistent vectors "
        "(114M parameters; paper: 1.00 / 0.98 bpb).",
        "model": dict(
            vocabulary_size=256, num_layers=36, hidden_dim=512, num_heads=8,
            persistent_memory_size=2048, max_span=8192, block_size=512,
            batch_size=64, adaptive_span=True, span_ramp=32, span_init=0.0,
            span_loss_coeff=1e-7, dropout=0.4,
        ),
        "recipe": dict(_CHAR_RECIPE, steps=200_000, final_steps=10_000),
    },
    "text8_small": {
        "description": "text8, enwik8_small's model over 27 characters "
        "(38M parameters; paper: 1.05 / 1.11 bpc).",
        "model": dict(
            vocabulary_size=27, num_layers=18, hidden_dim=512, num_heads=8,
            persistent_memory_size=1024, max_span=8192, block_size=512,
            batch_size=64, adaptive_span=True, span_ramp=32, span_init=0.0,
            span_loss_coeff=1e-7, dropout=0.3,
        ),
        "recipe": dict(_CHAR_RECIPE, steps=450_000, final_steps=30_000),
    },
    "text8_large": {
        "description": "text8, enwik8_large's model over 27 characters "
        "(114M parameters; paper: 1.02 / 1.08 bpc).",
        "model": dict(
            vocabulary_size=27, num_layers=36, hidden_dim=512, num_heads=8,
            persistent_memory_size=2048, max_span=8192, block_size=512,
            batch_size=64, adaptive_span=True, span_ramp=32, span_init=0.0,
            span_loss_coeff=1e-7, dropout=0.4,
        ),
        "recipe": dict(_CHAR_RECIPE, steps=200_000, final_steps=10_000),
    },
    "wikitext103": {
        "description": "WikiText-103, 36 layers, d 512, 2048 persistent "
        "vectors, adaptive input and softmax (133M parameters; paper: "
        "19.7 / 20.6 perplexity).",
        "model": dict(
            vocabulary_size=267_735, num_layers=36, hidden_dim=512,
            num_heads=8, persistent_memory_size=2048, max_span=2048,
            block_size=256, batch_size=64, adaptive_span=True, span_ramp=32,
            span_init=0.0, span_loss_coeff=5e-7, dropout=0.3,
            embedding_dropout=0.1, adaptive_cutoffs=[20_000, 40_000, 200_000],
            adaptive_div_val=4,
        ),
        "recipe": dict(
            optimizer="adam", learning_rate=2.5e-4, warmup_steps=8_000,
            clip=1.0, steps=800_000, final_steps=50_000,
        ),
    },
    "char_small_cpu": {
        "description": "A character model that trains in minutes on a CPU: "
        "4 layers, d 256, 128 persistent vectors, span up to 512.",
        "model": dict(
            vocabulary_size=256, num_layers=4, hidden_dim=256, num_heads=4,
            persistent_memory_size=128, max_span=512, block_size=128,
            batch_size=16, adaptive_span=True, span_ramp=32, span_init=0.0,
            span_loss_coeff=2e-6, dropout=0.1,
        ),
        "recipe": dict(
            optimizer="adam", learning_rate=1e-3, warmup_steps=100, clip=1.0,
            steps=3_000, final_steps=300,
        ),
    },
    "ptb_small_cpu": {
        "description": "A word-level model for Penn Treebank that trains on "
        "a CPU: 4 layers, d 256, 128 persistent vectors, span up to 256 "
        "words (set vocabulary_size from the corpus).",
        "model": dict(
            vocabulary_size=10_000, num_layers=4, hidden_dim=256, num_heads=4,
            persistent_memory_size=128, max_span=256, block_size=64,
            batch_size=16, adaptive_span=True, span_ramp=32, span_init=0.0,
            span_loss_coeff=5e-7, dropout=0.3, embedding_dropout=0.1,
        ),
        "recipe": dict(
            optimizer="adam", learning_rate=1e-3, warmup_steps=200, clip=1.0,
            steps=3_000, final_steps=300,
        ),
    },
    "char_tiny_cpu": {
        "description": "A tiny character model for smoke tests: 2 layers, "
        "d 64, 32 persistent vectors, span up to 64.",
        "model": dict(
            vocabulary_size=256, num_layers=2, hidden_dim=64, num_heads=4,
            persistent_memory_size=32, max_span=64, block_size=32,
            batch_size=8, adaptive_span=True, span_ramp=16, span_init=0.0,
            span_loss_coeff=1e-6, dropout=0.0,
        ),
        "recipe": dict(
            optimizer="adam", learning_rate=3e-3, warmup_steps=20, clip=1.0,
            steps=300, final_steps=0,
        ),
    },
}


def preset_names():
    """The names of all presets, sorted."""
    return sorted(PRESETS)


def get_preset(name):
    """A deep copy of the preset `name` (model arguments and recipe).

    Raises:
        ValueError: for an unknown name, naming the known ones.
    """
    if name not in PRESETS:
        raise ValueError(
            f"Unknown preset. Received: preset={name!r}. "
            f"Known presets: {preset_names()}"
        )
    return copy.deepcopy(PRESETS[name])


def check_buildable(name):
    """Raises ValueError if the preset needs a feature not built yet."""
    requires = PRESETS[name].get("requires")
    if requires:
        raise ValueError(
            f"The preset {name!r} needs {requires}. Received: preset={name!r}"
        )
