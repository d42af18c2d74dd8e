"""The approval page and approver sign-in of the central recorder (issue 12); see app.py."""

from __future__ import annotations

from aiohttp import web

from central.web.app import WebSettings, create_app, session_key
from central.web.store import WebStore

__all__ = ["WebSettings", "WebStore", "create_app", "mount", "session_key"]


def mount(parent: web.Application, settings: WebSettings, store: WebStore, prefix: str = "/ui") -> web.Application:
    """Add the page under `prefix` of the central recorder's app (its own middlewares and cookie)."""
    app = create_app(settings, store)
    app["prefix"] = prefix
    parent.add_subapp(prefix, app)
    return app
