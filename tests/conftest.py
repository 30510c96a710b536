"""Shared test helpers: the location of ../shared/data beside the checkout."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
  """../shared/data, or a skip saying why it is needed."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data folder {SHARED_DATA} is absent (it sits beside a "
                f"developer checkout, not in a user's clone)")
  return SHARED_DATA
