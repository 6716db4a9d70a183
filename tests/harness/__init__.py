"""What the tests share, one module per job.

``lines``: reading the event log (strict JSON, one object per line); ``gunicorn``: the real
server process; ``clients``: HTTP clients that misbehave on purpose or stop half way; ``load``:
batches with known answers, sent concurrently; ``wsgi``: requests through the Flask test client
that only a real server would otherwise make; ``openapi``: checking a response against the
served document.
"""
