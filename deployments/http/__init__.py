"""The ingress's private helpers: HTTP schemas, responses, error handlers, request metrics."""
