"""The test project: a small blog like the site mcpage was born from.

Configured from the environment by the tests (``BLOG_*`` and ``MCPAGE_*``).
"""

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent
SECRET_KEY = "tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "blog.urls"
WSGI_APPLICATION = "blog.wsgi.application"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "mcpage",
    "blog.apps.BlogConfig",
]

MIDDLEWARE = [
    "mcpage.middleware.CacheTagsMiddleware",  # first: sees what the others did
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("BLOG_DB", str(BASE_DIR / "blog.sqlite3")),
    }
}

LOGIN_REDIRECT_URL = "/"

# mcpage: where the proxy listens (a unix socket in the tests); the token
# comes from MCPAGE_PROXY__INVALIDATE_TOKEN, as the proxy's does.
MCPAGE_PROXY_URL = os.environ.get("BLOG_MCPAGE_PROXY_URL", "http://127.0.0.1:8081")
# Third-party views, tagged by URL (StaticGenerator's STATIC_GENERATOR_URLS).
MCPAGE_URLS = {
    r"^/about/$": ["about"],
    r"^/pages/(?P<slug>[-\w]+)/$": ["page:{slug}"],
}
MCPAGE_EXCLUDE_URLS = [r"^/pages/private-"]
MCPAGE_RETRY_DELAY = 0.05
MCPAGE_RETRY_MAX_DELAY = 0.5

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"mcpage": {"handlers": ["stderr"], "level": "DEBUG"}},
}
