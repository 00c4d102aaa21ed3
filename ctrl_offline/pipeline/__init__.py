"""What the recipes build on: the recipe config schema and the prompt sources (above the stages)."""
