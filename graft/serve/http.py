"""HTTP errors as every endpoint answers them: OpenAI's error shape, with the status and the field;
and the base of every request body."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict


class HTTPError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def check_token_ids(ids: list[int], vocab: int, where: str, param: str) -> None:
    """A 422 naming ``where`` (the request's ``param``) for a token id outside the vocabulary."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise HTTPError(422, f"{where}: token id {bad} is not in the vocabulary (0..{vocab - 1})", param)


def too_long(
    where: str,
    tokens: int,
    limit: int,
    param: str,
    cut: str = "cut it",
    holds: str = "the model takes at most",
) -> HTTPError:
    """The 413 for ``where``, an input of ``tokens`` over the model's ``limit``, saying what
    "truncate" would do (``cut``)."""
    return HTTPError(
        413, f'{where} has {tokens} tokens; {holds} {limit} (send "truncate": true to {cut})', param
    )


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


class Body(BaseModel):
    """A request body: a field the server does not know (a typo, an option it does not implement)
    is refused with a 422 that names it, never silently ignored."""

    model_config = ConfigDict(extra="forbid")
