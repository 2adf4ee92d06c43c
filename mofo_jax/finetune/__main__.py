import sys

from mofo_jax.finetune.cli import main

sys.exit(main())
