"""Print samples from a trained `AllAttentionLM` checkpoint (`.keras` file).

    KERAS_BACKEND=jax python examples/generate.py --checkpoint model.keras \
        --tokenizer byte --prompt "The " --max-length 300 --sampler top_p

--tokenizer picks how text becomes token ids, matching the corpus the model
was trained on: `byte` (enwik8 and `examples/quickstart.py`: ids are byte
values), `text8` (27 symbols: space and a-z), `ptb` or `wikitext103` (word
level; the vocabulary is rebuilt from the training split in --corpus), or
`ids` (the prompt is space-separated token ids, printed back as ids).

This script is `keras-allattn generate` (installed with the package).
"""

import sys

from keras_allattn.cli import generate

if __name__ == "__main__":
    sys.exit(generate.main(doc=__doc__))
