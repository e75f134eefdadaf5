from training import selectors


def training_nav(request):
    """`can_train` for the top bar: only project admins see the Training link. A callable, so
    the query runs only on pages that render the link."""
    user = getattr(request, "user", None)
    return {"can_train": lambda: selectors.projects_admin_for_user(user=user).exists()}
