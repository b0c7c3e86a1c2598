# Tests import the flat top-level modules (phi2.py, vit.py, ...) from the repository root.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
