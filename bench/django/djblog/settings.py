"""Settings of the benchmark baseline: the demo's home page in Django."""

import os

BASE_DIR = os.path.dirname(os.path.abspath(__file__))

SECRET_KEY = "mcpage-bench-only"  # noqa: S105 (a loopback benchmark, no secrets)
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "djblog.urls"
WSGI_APPLICATION = "djblog.wsgi.application"
INSTALLED_APPS = ["djblog"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("MCPAGE_BENCH_DB", os.path.join(BASE_DIR, "demo.sqlite3")),
        # Persistent connections: the fastest setting, not Django's default (0).
        "CONN_MAX_AGE": None,
    }
}
# The demo's own templates (minijinja's syntax is Jinja2's): the very same
# HTML, and Jinja2 is the faster of Django's two template engines.
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.jinja2.Jinja2",
        "DIRS": [os.path.join(BASE_DIR, "..", "..", "..", "crates", "mcpage-demo", "templates")],
        "OPTIONS": {"autoescape": True},
    }
]
USE_TZ = False
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
LOGGING_CONFIG = None
