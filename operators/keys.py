"""Stable key hashing into key groups.

The hash never depends on the process, run or machine (Python's salted
``hash()`` is never used): integers are mixed with the murmur3 finalizer in
Arrow kernels, fully vectorized; strings and binaries are hashed once per
distinct value per batch with CRC-32.

>>> import pyarrow as pa
>>> key_groups(pa.array([1, 2, 3, 1]), 128).to_pylist()
[44, 103, 78, 44]
>>> key_groups(pa.array(["a", "b", "a"]), 128).to_pylist()
[67, 121, 67]
"""

from __future__ import annotations

import zlib

import pyarrow as pa
import pyarrow.compute as pc

_U64 = pa.uint64()
_M1 = pa.scalar(0xFF51AFD7ED558CCD, _U64)
_M2 = pa.scalar(0xC4CEB9FE1A85EC53, _U64)
_S33 = pa.scalar(33, _U64)


def _mix64(values: pa.Array) -> pa.Array:
    x = pc.cast(values, _U64, safe=False)
    x = pc.bit_wise_xor(x, pc.shift_right(x, _S33))
    x = pc.multiply(x, _M1)
    x = pc.bit_wise_xor(x, pc.shift_right(x, _S33))
    x = pc.multiply(x, _M2)
    return pc.bit_wise_xor(x, pc.shift_right(x, _S33))


def _crc_distinct(values: pa.Array) -> pa.Array:
    distinct = pc.unique(values)
    hashes = pa.array(
        [0 if v is None else zlib.crc32(v if isinstance(v, bytes) else v.encode()) for v in distinct.to_pylist()],
        _U64,
    )
    return pc.take(hashes, pc.index_in(values, value_set=distinct))


def stable_hash(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A uint64 hash per value, identical in every process. Nulls hash to a fixed value."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_dictionary(t):
        values = values.dictionary_decode()
        t = values.type
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_temporal(t):
        if not pa.types.is_integer(t):
            values = pc.cast(values, pa.int64())
        hashed = _mix64(pc.cast(values, pa.int64()))
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        hashed = _crc_distinct(values)
    else:
        raise TypeError(
            f"cannot key by a column of type {t}: use an integer, string, binary, boolean or temporal column "
            "(cast it in map_batches first)"
        )
    return pc.fill_null(hashed, pa.scalar(0, _U64))


def key_groups(values: pa.Array | pa.ChunkedArray, max_key_groups: int) -> pa.Array:
    """The key group (int32) of each value."""
    hashed = stable_hash(values)
    return pc.cast(pc.remainder(hashed, pa.scalar(max_key_groups, _U64)), pa.int32())
