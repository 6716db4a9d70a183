"""The analytics ingestion service: one module per concern, assembled by ``app.create_app``."""
