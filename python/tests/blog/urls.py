from django.contrib.auth import views as auth_views
from django.urls import path
from django.views.generic import TemplateView

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("articles/<int:pk>/", views.article, name="article"),
    path("articles/<int:pk>/comments/", views.comment, name="comment"),
    path("category/<slug:slug>/", views.category, name="category"),
    path("about/", TemplateView.as_view(template_name="blog/about.html"), name="about"),
    path("pages/<slug:slug>/", views.page, name="page"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
]
