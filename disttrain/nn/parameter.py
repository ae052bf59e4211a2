"""Parameter: a leaf tensor that a Module registers as one of its trainable weights."""
from disttrain.tensor import Tensor


class Parameter(Tensor):
    """A Tensor that requires grad by default; assigning one to a Module attribute registers it."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data.data if isinstance(data, Tensor) else data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()
