"""python -m tests.golden CASE_DIR [...]: see tests/golden/__init__.py."""
import sys

from tests.golden import main

sys.exit(main(sys.argv[1:]))
