"""One registry of named components shared by every recipe.

Each kind fixes a constructor contract, so builders pass the shared sizes and a config only names the
component:

- ``attention``: layers ``cls(d_model, heads, dropout)`` called as ``(x, context=None, mask=None, causal=False,
  cache=None)``; the kernel ``scaled_dot_product`` inside them is ``cls(dropout)`` called on ``(q, k, v, mask, causal)``
- ``position``: ``cls(d_model, max_len)`` called as ``(x, offset=0)`` on the input embeddings, or
  (``acts_on = "queries_keys"``, rotary) ``cls(head_dim, max_len)`` called on attention's queries and keys
- ``block``: ``cls(d_model, heads, d_ff, dropout, activation)``, plus the block's own keyword options
  (``conformer``: ``kernel_size``, ``attention``; causal blocks: ``rotary``); ``role`` says its stack
- ``feed_forward``: ``cls(d_model, d_ff, dropout, activation, bias)``; ``norm``: ``cls(d_model)``
- ``activation``: ``cls()``
- ``embedding``: inputs to tokens, each with its own arguments (``patch``: ``cls(channels, d_model, patch)``,
  ``token``: ``cls(vocab_size, d_model, max_positions, segments, dropout)``, ``conv2d_subsampling``:
  ``cls(features, d_model, channels, dropout)`` called as ``(features, lengths)``)
- ``recipe``: ``cls(config)``, see :class:`tfkit.recipe.Recipe`

Components register by explicit import (``tfkit.nn`` and ``tfkit.recipes``), never by scanning folders.
"""

from __future__ import annotations

from typing import Any, Callable

from tfkit.errors import UsageError

_entries: dict[str, dict[str, Any]] = {}


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Class decorator: ``@register("attention", "multi_head")``."""

    def add(obj: Any) -> Any:
        entries = _entries.setdefault(kind, {})
        if name in entries and entries[name] is not obj:
            raise ValueError(f"{kind} '{name}' is registered twice")
        entries[name] = obj
        return obj

    return add


def get(kind: str, name: str) -> Any:
    if kind not in _entries:
        raise UsageError(f"unknown component kind '{kind}' (valid: {', '.join(kinds())})")
    entries = _entries[kind]
    if name not in entries:
        raise UsageError(f"unknown {kind} '{name}' (valid: {', '.join(sorted(entries))})")
    return entries[name]


def names(kind: str) -> list[str]:
    return sorted(_entries.get(kind, {}))


def kinds() -> list[str]:
    return sorted(_entries)


def summary(obj: Any) -> str:
    """The first line of a component's docstring."""
    doc = (obj.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def load_all() -> None:
    """Import every module that registers something."""
    import tfkit.nn  # noqa: F401
    import tfkit.recipes  # noqa: F401
