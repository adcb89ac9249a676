"""Tensor codec: numpy array <-> ``Tensor`` (raw little-endian bytes + dtype + shape).

Pure functions. Decoding validates everything a publisher could get wrong, because
features may come from any AMQP client, not only from our preprocess stage.
"""

from __future__ import annotations

import math

import numpy as np

from toposerve.brokers import Tensor


class TensorError(ValueError):
    """A ``Tensor`` whose bytes do not match its dtype and shape."""


def encode_tensor(array: np.ndarray) -> Tensor:
    dtype = array.dtype.newbyteorder("<")
    contiguous = np.asarray(array).astype(dtype, order="C", copy=False)  # keeps a 0-d shape, unlike ascontiguousarray
    return Tensor(dtype=contiguous.dtype.name, shape=list(contiguous.shape), data=contiguous.tobytes())


def decode_tensor(tensor: Tensor, max_elements: int = 50_000_000) -> np.ndarray:
    # Each dimension on its own too: a zero anywhere makes the product 0, and a huge
    # neighbour (``[0, 10**30]``) would still overflow numpy's shape.
    if any(dim > max_elements for dim in tensor.shape):
        raise TensorError(f"tensor shape {tensor.shape} has a dimension over the limit of {max_elements} elements")
    count = math.prod(tensor.shape)
    if count > max_elements:
        raise TensorError(f"tensor has {count} elements, more than the limit of {max_elements}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"tensor data is {len(tensor.data)} bytes but dtype {tensor.dtype} and shape {tensor.shape} need {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
