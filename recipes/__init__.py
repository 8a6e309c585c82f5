"""Task recipes: each registers itself under the registry kind "recipe"."""

from tfkit.recipes import bert, conformer, translation, vit  # noqa: F401
