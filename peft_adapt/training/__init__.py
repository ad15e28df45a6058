"""Train one adapter per domain from a recipe: the recipe, the path one domain takes, evaluation and metrics."""
