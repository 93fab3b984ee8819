"""Recipe files (YAML) shipped with srbinarize; load them with `srbinarize.load_recipe(name)`."""
