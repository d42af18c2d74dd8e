"""One policy model for every protocol: identity × destination × operation → decision."""
