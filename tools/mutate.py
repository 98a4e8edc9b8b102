"""Mutation testing of the core modules (see megagsm/testing/mutate.py): `make mutate`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megagsm.testing.mutate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
