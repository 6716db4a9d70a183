"""Every error response, built in one place so that all share one JSON shape."""

from collections.abc import Mapping
from typing import Any

import structlog
from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from analytics import messages

log = structlog.get_logger()


class ApiError(Exception):
    """A request the service answers with an error: raised anywhere, rendered by one handler."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        # Headers the answer carries besides the body's fields, such as a 503's Retry-After.
        self.headers = dict(headers or {})
        self.extra = extra


def error_response(status: int, message: str, **extra: Any) -> Response:
    """The JSON body ``{"error": message, **extra}`` with the given status."""
    response = jsonify(error=message, **extra)
    response.status_code = status
    return response


def _handle_api_error(error: ApiError) -> Response:
    """A refusal the service decided on, anywhere below the view."""
    response = error_response(error.status, error.message, **error.extra)
    response.headers.update(error.headers)
    return response


def _handle_http_exception(error: HTTPException) -> Response:
    """Werkzeug's errors (404, 405, ...) as JSON, keeping their headers such as Allow."""
    response = error.get_response()
    body = error_response(error.code or 500, messages.http_error_message(error.name or "Error"))
    response.data = body.data
    response.content_type = body.content_type
    return response


def _handle_unexpected(error: Exception) -> Response:
    """A bug of ours: logged with its traceback, answered as JSON rather than Flask's HTML page."""
    log.exception("unhandled_exception")
    return error_response(500, messages.INTERNAL_ERROR)


def register_error_handlers(app: Flask) -> None:
    """Register the handlers on the app, where they also see routing's 404 and 405."""
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
