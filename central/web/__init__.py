"""The approval page and approver sign-in of the central recorder (issue 12); see app.py."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from central.web.app import WebSettings, create_app, session_key
from central.web.store import WebStore

__all__ = ["WebSettings", "WebStore", "attach", "create_app", "mount", "session_key"]


def mount(parent: web.Application, settings: WebSettings, store: WebStore, prefix: str = "/ui") -> web.Application:
    """Add the page under `prefix` of the central recorder's app (its own middlewares and cookie)."""
    app = create_app(settings, store)
    app["prefix"] = prefix
    parent.add_subapp(prefix, app)
    return app


def attach(app: web.Application, config: Path, state_dir: Path, dsn: str, pool, need_host) -> None:
    """Everything issue 12 adds to the recorder's app: the page under /ui and the hosts' answer
    channel (/v1/decisions, central/stream.py). `pool`: the app's psycopg pool; `need_host(request)`
    the host id of an mTLS host request (refusing others)."""
    from central.stream import DecisionStream
    from central.web.config import load

    store = WebStore(pool)
    settings = load(config, state_dir)
    mount(app, settings, store)
    DecisionStream(store, dsn, need_host).routes(app)
    if settings.webhooks:
        from central.web.notices import Notices

        Notices(store, list(settings.webhooks), settings.origin + "/ui").attach(app)
