from django.apps import AppConfig


class BlogConfig(AppConfig):
    name = "blog"

    def ready(self) -> None:
        from mcpage import invalidate_on_change

        from .models import Article, Comment

        # Every write path (views, admin, shell) invalidates after its commit.
        invalidate_on_change(Comment, tags=["comments", "article:{article_id}"])
        invalidate_on_change(Article, tags=["articles", "article:{pk}"])
