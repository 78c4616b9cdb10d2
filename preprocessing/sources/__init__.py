"""Image sources: where fields of view come from (synthetic generator, downloaded sets)."""
