import sys

from glp_jax.cli import main

sys.exit(main())
