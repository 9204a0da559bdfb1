"""Gradient states: pytrees holding what a gradient kernel needs from its forward kernel,
named after their MPS counterparts. Arrays are leaves; op settings are static metadata."""

from __future__ import annotations

import dataclasses

import jax


def gradient_state(cls):
    """Class decorator: a frozen dataclass registered as a pytree whose fields marked
    ``static_field()`` are metadata (hashable settings) and the rest are array leaves."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static")]
    meta = [f.name for f in fields if f.metadata.get("static")]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)


def static_field(**kwargs):
    return dataclasses.field(metadata={"static": True}, **kwargs)
