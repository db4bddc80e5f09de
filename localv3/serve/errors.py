"""Errors as the OpenAI API reports them: an HTTP status and an `{"error": {...}}` body."""

from __future__ import annotations

from localv3.errors import LocalV3Error


class ApiError(LocalV3Error):
    """A request the server refuses or could not answer; `body()` is what the client receives."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def server_error(message: str) -> ApiError:
    return ApiError(500, message, type="server_error", code="internal_error")


def unavailable(message: str) -> ApiError:
    return ApiError(503, message, type="server_error", code="model_not_ready")
