"""Triton's TraceSetting and LogSettings over the server's tracing and logging (both admin-only RPCs).

TraceSetting keys: `trace_level` (OFF or TIMESTAMPS), `trace_rate` (one request in N is sampled),
`trace_mode` (opentelemetry); a key sent with no value goes back to its value at start. `trace_count`,
`log_frequency` and `trace_file` are Triton's file tracer's and are read-only here. Settings apply to every
model: a `model_name` is refused.

LogSettings keys: `log_info`, `log_warning`, `log_error` (bools: the lowest true one sets the level),
`log_verbose_level` (above 0: DEBUG), `log_format` (`text` or `json`; Triton's `default` and `ISO8601`
are text). Logs go to stderr: a `log_file` is refused.
"""

from __future__ import annotations

import logging

from ....engine.errors import InvalidInput, NotInstalled
from ....wire.inference import grpc_service_pb2 as pb
from ...logs import LogControl
from ...tracing import LEVELS, Tracing

_TRACE_READ_ONLY = {"trace_count": "-1", "log_frequency": "0", "trace_file": ""}


def trace_setting(tracing: Tracing, request: pb.TraceSettingRequest) -> pb.TraceSettingResponse:
    if request.model_name:
        raise InvalidInput("trace settings apply to every model: send them without model_name")
    for key, setting in request.settings.items():
        values = list(setting.value)
        if key == "trace_level":
            level = (values[0] if values else ("TIMESTAMPS" if tracing.config.enabled else "OFF")).upper()
            if level not in LEVELS:
                raise InvalidInput(f"trace_level {level}: choose OFF or TIMESTAMPS")
            if level == "OFF":
                tracing.disable()
            else:
                try:
                    tracing.enable()
                except RuntimeError as e:
                    raise NotInstalled(str(e)) from None
        elif key == "trace_rate":
            if not values:
                tracing.reset_ratio()
                continue
            if not values[0].isdigit() or int(values[0]) < 1:
                raise InvalidInput(f"trace_rate {values[0]!r}: one request in N is traced, N >= 1")
            tracing.set_ratio(1 / int(values[0]))
        elif key == "trace_mode":
            if values and values[0].lower() != "opentelemetry":
                raise InvalidInput(f"trace_mode {values[0]}: only opentelemetry is served")
        elif key in _TRACE_READ_ONLY:
            raise InvalidInput(f"{key} belongs to Triton's file tracer; spans are exported over OTLP")
        else:
            raise InvalidInput(f"unknown trace setting {key!r} (trace_level, trace_rate, trace_mode)")
    current = {"trace_level": "TIMESTAMPS" if tracing.on else "OFF", "trace_rate": str(tracing.rate),
               "trace_mode": "opentelemetry", **_TRACE_READ_ONLY}
    return pb.TraceSettingResponse(settings={k: pb.TraceSettingResponse.SettingValue(value=[v] if v else [])
                                             for k, v in current.items()})


_LEVEL_KEYS = {"log_error": logging.ERROR, "log_warning": logging.WARNING, "log_info": logging.INFO}


def log_settings(logs: LogControl, request: pb.LogSettingsRequest) -> pb.LogSettingsResponse:
    settings = request.settings
    for key, value in settings.items():
        if key == "log_file":
            if value.string_param:
                raise InvalidInput("logs go to stderr (the container's log); a log_file is not supported")
        elif key == "log_format":
            fmt = {"default": "text", "iso8601": "text"}.get(value.string_param.lower(), value.string_param.lower())
            try:
                logs.set_format(fmt)
            except ValueError as e:
                raise InvalidInput(str(e)) from None
        elif key not in _LEVEL_KEYS and key != "log_verbose_level":
            raise InvalidInput(f"unknown log setting {key!r} (log_info, log_warning, log_error, log_verbose_level, "
                               "log_format)")
    if any(k in settings for k in (*_LEVEL_KEYS, "log_verbose_level")):
        level = logging.CRITICAL
        for key, value in sorted(_LEVEL_KEYS.items(), key=lambda kv: kv[1]):
            enabled = settings[key].bool_param if key in settings else logs.level <= value
            if enabled:
                level = value
                break
        if "log_verbose_level" in settings and settings["log_verbose_level"].uint32_param > 0:
            level = logging.DEBUG
        elif "log_verbose_level" not in settings and logs.level <= logging.DEBUG:
            level = logging.DEBUG
        logs.set_level(level)
    value = pb.LogSettingsResponse.SettingValue
    level = logs.level
    return pb.LogSettingsResponse(settings={
        "log_file": value(string_param=""),
        "log_info": value(bool_param=level <= logging.INFO),
        "log_warning": value(bool_param=level <= logging.WARNING),
        "log_error": value(bool_param=level <= logging.ERROR),
        "log_verbose_level": value(uint32_param=1 if level <= logging.DEBUG else 0),
        "log_format": value(string_param=logs.format),
    })
