"""`python -m lvlm ...` equals the `lvlm` console script."""
import sys

from lvlm.cli.main import main

sys.exit(main())
