"""The demo's tables (crates/mcpage-demo/src/db.rs), read as they are."""

from django.db import models


class Category(models.Model):
    slug = models.TextField(unique=True)
    name = models.TextField()
    description = models.TextField()

    class Meta:
        managed = False
        db_table = "categories"


class Article(models.Model):
    title = models.TextField()
    summary = models.TextField()
    body = models.TextField()
    category = models.ForeignKey(Category, models.DO_NOTHING, related_name="articles")
    published_at = models.TextField()

    class Meta:
        managed = False
        db_table = "articles"


class Comment(models.Model):
    article = models.ForeignKey(Article, models.DO_NOTHING, related_name="comments")
    author = models.TextField()
    body = models.TextField()
    created_at = models.TextField()

    class Meta:
        managed = False
        db_table = "comments"


class MenuItem(models.Model):
    position = models.IntegerField(primary_key=True)
    label = models.TextField()
    href = models.TextField()

    class Meta:
        managed = False
        db_table = "menu"


class Session(models.Model):
    token = models.TextField(primary_key=True)
    name = models.TextField()
    csrf = models.TextField()
    created_at = models.TextField()

    class Meta:
        managed = False
        db_table = "sessions"
