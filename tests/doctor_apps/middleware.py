"""The healthy app wrapped in greenscope's WSGI middleware (for gevent's pywsgi)."""

from doctor_apps import healthy
from greenscope.wsgi import GreenscopeMiddleware

app = GreenscopeMiddleware(healthy.app)


class Outer:
    """Another middleware around greenscope's (ProxyFix-like: the next app in ``.app``)."""

    def __init__(self, app: object) -> None:
        self.app = app

    def __call__(self, environ: object, start_response: object) -> object:
        return self.app(environ, start_response)  # type: ignore[operator]


wrapped = Outer(app)
