"""One policy model for every protocol: identity × destination × operation → decision."""

from policy import compiled as _compiled

_compiled.install()  # before any hot module is imported: a stale compiled build never runs
