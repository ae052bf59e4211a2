import pytest

import disttrain as dt


@pytest.fixture(autouse=True)
def seeded():
    """Every layer test starts from the same library RNG state (initialisers, dropout)."""
    dt.random.manual_seed(0)
