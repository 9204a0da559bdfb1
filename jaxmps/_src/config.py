"""Which implementation an op uses: ``"native"`` kernels, the jnp ``"reference"``, or ``"auto"``.

Resolution order for ``implementation=None``: the innermost :func:`use_implementation` context,
else the ``JAXMPS_IMPLEMENTATION`` environment variable, else ``"auto"`` (native where the
platform that compiles the program has a native kernel, reference elsewhere). Like
``jax.default_matmul_precision``, the choice is read when an op is *traced*: a function that
was already jit-compiled keeps the implementation it was traced with.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

IMPLEMENTATIONS = ("native", "reference")
_ENV_VAR = "JAXMPS_IMPLEMENTATION"
_local = threading.local()


def _check(op: str, implementation: str, source: str) -> str:
    if implementation not in IMPLEMENTATIONS and implementation != "auto":
        raise ValueError(
            f"jaxmps.{op}: {source} must be one of None, 'native', 'reference'"
            f" (or 'auto'), got {implementation!r}"
        )
    return implementation


def resolve(op: str, implementation: Optional[str]) -> str:
    """Returns "auto", "native" or "reference" for an op's ``implementation`` argument."""
    if implementation is not None:
        return _check(op, implementation, "implementation")
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(_ENV_VAR, "").strip()
    if env:
        return _check(op, env, f"the {_ENV_VAR} environment variable")
    return "auto"


@contextlib.contextmanager
def use_implementation(implementation: Optional[str]) -> Iterator[None]:
    """Context manager setting the default ``implementation`` of every jaxmps op traced inside.

    ``use_implementation("reference")`` forces the pure-jnp path (e.g. to compare with native
    kernels); ``None`` or ``"auto"`` restores automatic selection. Thread-local.
    """
    value = "auto" if implementation is None else _check(
        "use_implementation", implementation, "implementation")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(value)
    try:
        yield
    finally:
        stack.pop()
