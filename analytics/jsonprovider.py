"""Flask's JSON through orjson: several times faster than the stdlib on every response."""

from typing import Any

import orjson
from flask import Response
from flask.json.provider import JSONProvider


class OrjsonProvider(JSONProvider):
    """``app.json`` backed by orjson; responses keep the key order they were built in."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        # orjson's bytes go straight into the body, without a round trip through str.
        return self._app.response_class(
            orjson.dumps(self._prepare_response_obj(args, kwargs)), mimetype="application/json"
        )
