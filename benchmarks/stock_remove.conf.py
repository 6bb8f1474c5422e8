"""The fair baseline for the end-to-end benchmark: stock -k gevent, SQLAlchemy's
scoped_session (the demo app in "stock" mode) and the hand-written request-end removal
that careful users write today."""

from typing import Any

worker_class = "gevent"


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    import demo_app  # noqa: PLC0415 - the app module, loaded by gunicorn before any request

    demo_app.Session.remove()
