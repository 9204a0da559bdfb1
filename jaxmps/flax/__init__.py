"""Flax layers for jaxmps: ``jaxmps.flax.linen`` and ``jaxmps.flax.nnx``.

Both follow Flax's own conventions (``use_scale``/``use_bias``, ``scale_init``/``bias_init``,
``dtype``/``param_dtype``, parameters named ``scale``/``bias``/``kernel``, running statistics
in the ``batch_stats`` collection / ``nnx.BatchStat``) and pass ``implementation=`` through to
the jaxmps ops. Flax is an optional dependency: ``pip install jaxmps[flax]``.
"""

try:
    import flax as _flax  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without flax installed
    raise ImportError("jaxmps.flax needs Flax: pip install flax (or jaxmps[flax])") from e

from . import linen, nnx

__all__ = ["linen", "nnx"]
