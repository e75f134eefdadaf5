"""A Content-Security-Policy on every response (Django 5.2 has none built in).

Prompts and completions are untrusted text: they are sanitized (nh3), and this policy is the
second layer. Only this origin's scripts run (the pages have no inline script), and images
come only from this origin, so a dataset cannot make a labeler's browser load a tracking
image. Inline styles stay allowed (uPlot and Swagger UI set element styles)."""

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


class ContentSecurityPolicyMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response
