import sys
from pathlib import Path

# pytest runs in importlib mode (see pyproject.toml), which leaves test directories off sys.path;
# the shared test inputs live beside the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
