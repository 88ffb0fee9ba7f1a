import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReportStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPORT_STATUS_UNSPECIFIED: _ClassVar[ReportStatus]
    REPORT_STATUS_COMMITTED: _ClassVar[ReportStatus]
    REPORT_STATUS_DUPLICATE: _ClassVar[ReportStatus]
    REPORT_STATUS_LATE: _ClassVar[ReportStatus]
    REPORT_STATUS_UNKNOWN: _ClassVar[ReportStatus]
REPORT_STATUS_UNSPECIFIED: ReportStatus
REPORT_STATUS_COMMITTED: ReportStatus
REPORT_STATUS_DUPLICATE: ReportStatus
REPORT_STATUS_LATE: ReportStatus
REPORT_STATUS_UNKNOWN: ReportStatus

class ReportUsageRequest(_message.Message):
    __slots__ = ("request_id", "model", "provider", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ("status", "cost_micros")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    COST_MICROS_FIELD_NUMBER: _ClassVar[int]
    status: ReportStatus
    cost_micros: int
    def __init__(self, status: _Optional[_Union[ReportStatus, str]] = ..., cost_micros: _Optional[int] = ...) -> None: ...

class GetBudgetsRequest(_message.Message):
    __slots__ = ("headers", "bearer", "model", "provider")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BEARER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    headers: _containers.ScalarMap[str, str]
    bearer: str
    model: str
    provider: str
    def __init__(self, headers: _Optional[_Mapping[str, str]] = ..., bearer: _Optional[str] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("rule", "bucket", "action", "limit_micros", "spent_micros", "reserved_micros", "remaining_micros", "resets_at", "unit", "limit", "spent", "reserved", "remaining", "tokens")
    RULE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LIMIT_MICROS_FIELD_NUMBER: _ClassVar[int]
    SPENT_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MICROS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SPENT_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    rule: str
    bucket: str
    action: str
    limit_micros: int
    spent_micros: int
    reserved_micros: int
    remaining_micros: int
    resets_at: _timestamp_pb2.Timestamp
    unit: str
    limit: int
    spent: int
    reserved: int
    remaining: int
    tokens: str
    def __init__(self, rule: _Optional[str] = ..., bucket: _Optional[str] = ..., action: _Optional[str] = ..., limit_micros: _Optional[int] = ..., spent_micros: _Optional[int] = ..., reserved_micros: _Optional[int] = ..., remaining_micros: _Optional[int] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., unit: _Optional[str] = ..., limit: _Optional[int] = ..., spent: _Optional[int] = ..., reserved: _Optional[int] = ..., remaining: _Optional[int] = ..., tokens: _Optional[str] = ...) -> None: ...

class GetBudgetsResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    def __init__(self, budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ...) -> None: ...
