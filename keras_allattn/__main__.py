"""`python -m keras_allattn COMMAND`: the `keras-allattn` command."""

import sys

from keras_allattn.cli import main

sys.exit(main())
