"""The error -> status table: every error class has a row, and clients get details they can act on."""

from __future__ import annotations

import logging

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2

from modelstore import Role, parse_air
from modelstore import errors as store_errors
from server.api.boundary import INTERNAL_MESSAGE, Logged, ModelField, failure_for, rpc_error_for, status_code_for
from server.core import errors


def _subclasses(root: type[BaseException]) -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    pending = [root]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


ERROR_CLASSES = _subclasses(errors.ServerError) + _subclasses(store_errors.ModelStoreError)


def test_both_trees_are_walked() -> None:
    names = {cls.__name__ for cls in ERROR_CLASSES}
    assert {"InvalidRequest", "JobCancelled", "ModelNotFound", "WrongArchitecture"} <= names


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
def test_every_error_class_has_a_row(cls: type[BaseException]) -> None:
    # The lookup only looks at the class, so an instance needs none of its constructor's arguments.
    code = status_code_for(cls.__new__(cls))
    assert code is not None, f"{cls.__name__} has no row in server/api/boundary.py"
    assert code is not grpc.StatusCode.INTERNAL


def _bad_request(err_details: tuple[any_pb2.Any, ...]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for detail in err_details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out.extend((v.field, v.reason) for v in bad.field_violations)
    return out


def test_invalid_request_carries_field_violations() -> None:
    exc = errors.InvalidRequest(
        [errors.FieldViolation("steps", "too many"), errors.FieldViolation("refiner.start_step", "too late")]
    )
    rpc = rpc_error_for(exc)
    assert rpc.code is grpc.StatusCode.INVALID_ARGUMENT
    assert _bad_request(rpc.details) == [("steps", "INVALID_VALUE"), ("refiner.start_step", "INVALID_VALUE")]
    status = rpc.to_status()
    assert status.code == code_pb2.INVALID_ARGUMENT and status.message == rpc.message


FIELDS = (
    ModelField("model", "builtin:tiny-sdxl-base@1", Role.BASE),
    ModelField("refiner.model", "", Role.REFINER, default=parse_air("builtin:tiny-sdxl-refiner@1")),
)


def test_model_errors_name_their_field() -> None:
    # The store's error carries the AIR; the request's fields say where that AIR came from (here: a default).
    rpc = rpc_error_for(store_errors.ModelNotFound("no such model", air="builtin:tiny-sdxl-refiner@1"), FIELDS)
    assert rpc.code is grpc.StatusCode.NOT_FOUND
    assert rpc.message == "refiner.model: no such model"
    assert _bad_request(rpc.details) == [("refiner.model", "ModelNotFound")]


def test_a_model_in_both_roles_is_named_by_the_role_it_cannot_serve() -> None:
    base = "builtin:tiny-sdxl-base@1"
    fields = (ModelField("model", base, Role.BASE), ModelField("refiner.model", base, Role.REFINER))
    wrong = store_errors.WrongArchitecture("not a refiner", expected="x", found="y", role=Role.REFINER, air=base)
    assert _bad_request(rpc_error_for(wrong, fields).details) == [("refiner.model", "WrongArchitecture")]


def test_a_store_error_about_no_field_of_the_request_names_none() -> None:
    rpc = rpc_error_for(store_errors.SourceUnavailable("civitai is down", air="civitai:1@2"), FIELDS)
    assert rpc.message == "civitai is down" and rpc.details == ()


def test_overload_says_when_to_retry() -> None:
    rpc = rpc_error_for(errors.Overloaded("queue full", retry_after_s=2.5))
    assert rpc.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    (detail,) = rpc.details
    retry = error_details_pb2.RetryInfo()
    assert detail.Unpack(retry)
    assert retry.retry_delay.ToMilliseconds() == 2500


def test_unexpected_errors_are_internal_and_logged_not_leaked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    rpc = failure_for(KeyError("/secret/path"), "GetStatus")  # what the rpc decorator does with it
    assert rpc.code is grpc.StatusCode.INTERNAL
    assert rpc.message == INTERNAL_MESSAGE and rpc.details == ()
    assert any(r.exc_info and isinstance(r.exc_info[1], KeyError) for r in caplog.records)


def test_an_unexpected_error_is_logged_once_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="server.api.boundary")
    assert rpc_error_for(KeyError("/secret/path")).code is grpc.StatusCode.INTERNAL
    assert not caplog.records  # mapping alone logs nothing: pin_failure maps errors logged long ago
    failure_for(KeyError("/secret/path"), "GetStatus")
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "GetStatus failed: INTERNAL" in record.getMessage() and "/secret/path" not in record.getMessage()


def test_an_error_logged_where_it_happened_is_mapped_and_not_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="server.api.boundary")
    assert failure_for(Logged(KeyError("boom")), "Generate").code is grpc.StatusCode.INTERNAL
    assert failure_for(Logged(errors.JobCancelled("gone")), "Generate").code is grpc.StatusCode.CANCELLED
    assert not caplog.records


def test_a_known_error_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="server.api.boundary")
    failure = failure_for(errors.NotPinned("a+b is not pinned"), "UnpinPair", target="'a+b'", request_id="r1")
    assert failure.code is grpc.StatusCode.NOT_FOUND
    (record,) = caplog.records
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == "UnpinPair 'a+b' failed: NOT_FOUND: a+b is not pinned"
    assert (record.__dict__["outcome"], record.__dict__["request_id"]) == ("not_found", "r1")
