"""One page: the home page."""

from django.urls import path

from djblog import views

urlpatterns = [path("", views.home)]
