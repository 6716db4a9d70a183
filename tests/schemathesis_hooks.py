"""schemathesis hooks for this API, loaded through schemathesis.toml by the CLI and by tests/test_fuzz.py.

The OpenAPI document describes a text/plain body (navigator.sendBeacon's) as
what the service reads it as: a string holding the JSON text of a Batch
(``contentMediaType: application/json``, ``contentSchema: Batch``). JSON
Schema 2020-12 makes ``contentSchema`` an annotation, and schemathesis
generates such a string as any JSON text at all (``null``, ``[]``), which the
service refuses with the 400 the document predicts, so the check that valid
data is accepted would fail on data the document does not call valid. The hook
below has schemathesis generate (and mutate) the Batch itself; schemathesis
writes an object sent as text/plain as its JSON text.
"""

from typing import Any

import schemathesis


def generate_from_content_schema(document: dict[str, Any]) -> None:
    """Give each request body that is a JSON text its contentSchema as the schema to generate from, in place."""
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            for media in operation.get("requestBody", {}).get("content", {}).values():
                schema = media.get("schema", {})
                if schema.get("contentMediaType") == "application/json" and "contentSchema" in schema:
                    media["schema"] = schema["contentSchema"]


@schemathesis.hook
def before_load_schema(context: schemathesis.HookContext, raw_schema: dict[str, Any]) -> None:
    """Generate JSON-text bodies from their contentSchema."""
    generate_from_content_schema(raw_schema)
