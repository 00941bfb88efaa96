#!/usr/bin/env python
"""Convert official PyTorch RDT weights to rdt-jax (or back with --to-torch). See --help."""

import sys

from rdt_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
