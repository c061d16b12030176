from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from mcpage import cache_tags

from .models import Article, Category, Comment


@cache_tags("articles", "comments")
def home(request):
    return render(
        request,
        "blog/home.html",
        {
            "articles": Article.objects.order_by("id"),
            "latest": Comment.objects.select_related("article").order_by("-id")[:5],
        },
    )


@cache_tags("article:{pk}")
def article(request, pk):
    article = get_object_or_404(Article, pk=pk)
    return render(request, "blog/article.html", {"article": article})


@cache_tags("articles", "category:{slug}")
def category(request, slug):
    category = get_object_or_404(Category, slug=slug)
    return render(request, "blog/category.html", {"category": category})


def page(request, slug):
    """A view we do not own: tagged by MCPAGE_URLS."""
    return render(request, "blog/about.html", {"title": slug})


# The form on a cached page carries no CSRF token (a token is per visitor, and
# its cookie would keep the page out of the cache): this view is exempt.
@csrf_exempt
@require_POST
def comment(request, pk):
    article = get_object_or_404(Article, pk=pk)
    Comment.objects.create(
        article=article,
        author=request.POST.get("author", "anonymous"),
        text=request.POST["text"],
    )
    return redirect("article", pk=pk)
