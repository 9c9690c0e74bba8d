"""`RefineryError`'s fields are declared with their types, so that a type checker with grpcio's stubs
(`refinery-client[typing]`) sees `code` as a `grpc.StatusCode` rather than `Any` (issue 20)."""

from __future__ import annotations

import typing
from datetime import timedelta

import grpc

from refinery.client import RefineryError
from refinery.client.errors import FieldViolation


def test_refinery_error_declares_its_fields() -> None:
    hints = typing.get_type_hints(RefineryError)
    assert hints["code"] is grpc.StatusCode
    assert hints["message"] is str and hints["request_id"] is str
    assert hints["field_violations"] == tuple[FieldViolation, ...]
    assert hints["retry_delay"] == timedelta | None
    error = RefineryError(grpc.StatusCode.NOT_FOUND, "no such model")
    assert error.code is grpc.StatusCode.NOT_FOUND and str(error) == "NOT_FOUND: no such model"
