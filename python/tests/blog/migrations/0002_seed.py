"""Seed: two categories, three articles, a comment, and the user alice."""

from django.contrib.auth.hashers import make_password
from django.db import migrations


def seed(apps, schema_editor):
    Category = apps.get_model("blog", "Category")
    Article = apps.get_model("blog", "Article")
    Comment = apps.get_model("blog", "Comment")
    User = apps.get_model("auth", "User")
    news = Category.objects.create(slug="news", name="News")
    tech = Category.objects.create(slug="tech", name="Tech")
    first = Article.objects.create(pk=1, title="First post", body="Hello.", category=news)
    Article.objects.create(pk=2, title="Second post", body="More.", category=news)
    Article.objects.create(pk=3, title="On memcached", body="Keys.", category=tech)
    Comment.objects.create(article=first, author="bob", text="Nice start")
    User.objects.create(username="alice", password=make_password("wonderland"))


class Migration(migrations.Migration):
    dependencies = [("blog", "0001_initial"), ("auth", "0012_alter_user_first_name_max_length")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
