"""What the tests share, one module per job; no test module imports another.

``lines``: reading the event log (strict JSON, one object per line); ``gunicorn``: the real
server process, waiting for an event's line, and a refused start (``run_gunicorn``, ``refusal``);
``nginx``: real nginx running deploy/nginx.conf; ``clients``: HTTP clients, from a chosen address
or misbehaving on purpose; ``load``: batches with known answers, sent concurrently; ``events``:
events made to a purpose (the longest context, the most growth when written, a realistic page
view); ``costs``: CPU per body as a ratio to a valid batch's; ``memory``: a process's memory and what a
worker may hold; ``wsgi``: requests through the Flask
test client that only a real server would otherwise make; ``openapi``: checking a response
against the served document; ``engines``: what the NATS and Kafka sink tests share; ``nats``,
``kafka``, ``redis``: the real servers, started on free loopback ports.
"""
