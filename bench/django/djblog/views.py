"""The demo's home page: the same queries and templates as `web::home`."""

import datetime

from django.db.models import Count
from django.db.models.functions import Lower, Substr
from django.shortcuts import render

from djblog.models import Article, Category, MenuItem, Session

HOME_ARTICLES = 10
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]


def layout():
    """The menu, the category and month lists, and the render time."""
    months = []
    for row in (
        Article.objects.annotate(month=Substr("published_at", 1, 7))
        .values("month")
        .annotate(count=Count("id"))
        .order_by("-month")
    ):
        year, month = row["month"][:4], row["month"][5:7]
        months.append(
            {
                "href": f"/archive/{year}/{month}",
                "label": f"{MONTHS[int(month) - 1]} {year}",
                "count": row["count"],
            }
        )
    return {
        "menu": list(MenuItem.objects.order_by("position")),
        "categories": list(
            Category.objects.annotate(count=Count("articles")).order_by(Lower("name"))
        ),
        "months": months,
        "rendered_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }


def home(request):
    token = request.COOKIES.get("sessionid")
    user = Session.objects.filter(token=token).first() if token else None
    articles = [
        {
            "id": a.id,
            "title": a.title,
            "summary": a.summary,
            "category_slug": a.category.slug,
            "category_name": a.category.name,
            "published_at": a.published_at,
            "published": a.published_at[:10],
            "comments": a.comment_count,
        }
        for a in Article.objects.select_related("category")
        .annotate(comment_count=Count("comments"))
        .order_by("-published_at", "-id")[:HOME_ARTICLES]
    ]
    response = render(
        request,
        "home.html",
        {"layout": layout(), "user": user, "articles": articles},
    )
    if user is not None:
        response["Cache-Control"] = "private, no-cache"
    return response
