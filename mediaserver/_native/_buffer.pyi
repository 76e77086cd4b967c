"""Type-checking only (no module at run time): what the kernels take as audio."""

from typing import Any, Protocol, TypeAlias

from typing_extensions import Buffer

class _ArrayLike(Protocol):
    # numpy arrays, without importing numpy (not a dependency): numpy's stubs declare the buffer
    # protocol (__buffer__) only for Python 3.12 and later, so on 3.11 a type checker would not see it.
    @property
    def __array_interface__(self) -> dict[str, Any]: ...

_Buffer: TypeAlias = Buffer | _ArrayLike  # any contiguous buffer
