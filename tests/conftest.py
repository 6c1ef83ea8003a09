"""Shared set-up: the helpers next to this file (zoo, harness, measure) import by name."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
