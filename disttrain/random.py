"""The library's one random number generator: parameter initialisation (and anything else
that draws numbers) uses ``default_rng()``, so ``manual_seed(seed)`` makes a run repeatable."""
import numpy as np

_rng = np.random.default_rng()


def manual_seed(seed):
    """Reseed the library's generator; returns it. Same seed, same initial weights."""
    global _rng
    _rng = np.random.default_rng(seed)
    return _rng


def default_rng():
    """The generator every initialiser draws from (a ``numpy.random.Generator``)."""
    return _rng
