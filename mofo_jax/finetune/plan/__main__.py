"""``python -m mofo_jax.finetune.plan``: the same as ``mofo-finetune plan``."""

import sys

from mofo_jax.finetune.plan.command import main

sys.exit(main())
