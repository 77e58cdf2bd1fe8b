"""`python -m blip2_jax.serve`: see blip2_jax/serve/cli.py."""
import sys

from blip2_jax.serve.cli import main

sys.exit(main())
