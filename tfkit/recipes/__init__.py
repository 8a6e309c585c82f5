"""Task recipes: each registers itself under the registry kind "recipe"."""

from tfkit.recipes import bert, causal_lm, conformer, forecast, translation, vit  # noqa: F401
