import os
import sys

# Make `from tests.gradcheck import gradcheck` work however pytest is invoked.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
