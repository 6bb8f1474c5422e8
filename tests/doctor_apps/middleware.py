"""The healthy app wrapped in greenscope's WSGI middleware (for gevent's pywsgi)."""

from doctor_apps import healthy
from greenscope.wsgi import GreenscopeMiddleware

app = GreenscopeMiddleware(healthy.app)
