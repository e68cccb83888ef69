"""OpenAI error envelope ``{"error": {"message", "type", "param", "code"}}`` and the handlers
that put every failure into it: our own ``APIError``, FastAPI's validation errors (400, never
422), Starlette's routing errors (404/405/413) and anything unexpected (500, no traceback)."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("optimus.server")

_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_.]*): ")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error the client should see, with its HTTP status and envelope fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def envelope(self) -> dict:
        return error_envelope(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status, headers=self.headers)


def error_envelope(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unavailable(message: str, code: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code=code, headers={"Retry-After": str(retry_after)})


def from_engine_error(exc: BaseException) -> APIError:
    """Map what ``AsyncEngine.generate`` raises to the client-facing error. Internal failures
    reach the client as a fixed message; their exception text goes to the log only."""
    from optimus.core.errors import EngineDeadError, QueueFullError, RequestFailedError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return unavailable(f"server overloaded: {exc}", code="queue_full", retry_after=1)
    if isinstance(exc, EngineDeadError):
        return unavailable("the engine is not running; the server is restarting", code="engine_dead",
                           retry_after=10)
    if isinstance(exc, RequestFailedError):  # logged where it happened, in the engine
        return APIError(500, "internal error while decoding this request", code="internal_error")
    if isinstance(exc, ValueError):  # SamplingParams and the engine name the field first
        message = str(exc)
        named = _FIELD_PREFIX.match(message)
        return bad_request(message, param=named.group(1) if named else None)
    log.error("internal error", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


def _validation_message(err: dict) -> tuple[str, str | None]:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')}", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if kind == "missing":
        if param is None:
            return "request body is missing: send a JSON object", None
        return f"missing required field: {param}", param
    where = f"{param}: " if param else "request body: "
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return where + message, param


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    # A value that failed a check of ours says more than the union branches it did not match.
    errors = sorted(errors, key=lambda e: e.get("type") != "value_error")
    message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param=param).response()


async def _on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return APIError(500, "internal server error", code="internal_error").response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
