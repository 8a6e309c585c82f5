"""The shared component registry: attention, positions, blocks, embeddings."""

from tfkit.nn import attention, blocks, conformer, embeddings, position  # noqa: F401
