"""`python -m tessera.pretrain --config X.yaml [overrides]`: what torchrun launches (launch/)."""

import sys

from tessera.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
