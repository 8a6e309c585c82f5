"""The shared component registry: importing this package registers every component."""

from tfkit.nn import attention, blocks, position  # noqa: F401
