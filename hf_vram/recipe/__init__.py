"""Recipes: the schema (typed, strict, nested sections) and loading (names, extends, overrides, errors)."""

from hf_vram.recipe.load import LoadedRecipe, find_recipe, load_recipe, recipes_dir, shipped_recipes
from hf_vram.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "find_recipe", "load_recipe", "recipes_dir", "shipped_recipes"]
