import os
import sys
from pathlib import Path

# Tests import their helpers (parity_utils) as plain modules.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
