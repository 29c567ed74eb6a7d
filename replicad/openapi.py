"""The OpenAPI 3.1 description of the origin's HTTP API (``docs/api.md``).

Built in code (:func:`build`) so it stays next to the implementation
(:mod:`replicad.http_app`), and served at ``/openapi.json``. A test runs
schemathesis against a live server with this document, and another checks
that every route of :data:`replicad.http_app.ROUTES` is described here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build"]

_REF = "#/components/schemas/"
_HEX32 = "^[0-9a-f]{32}$"
_FIELD_TYPES = ["int", "float", "float32", "bool", "str", "bytes"]
_ERROR_CODES = [
    "bad_request",
    "schema_violation",
    "schema_error",
    "key_too_long",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "exists",
    "too_large",
    "timeout",
    "unsupported_media_type",
    "bad_frame",
    "storage_full",
    "internal",
]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF + name}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [schema, {"type": "null"}]}


def _schemas() -> dict[str, Any]:
    uint = {"type": "integer", "minimum": 0}
    hex_epoch = {"type": "string", "pattern": _HEX32, "description": "16 bytes, hex"}
    field_type = {
        "type": "string",
        "enum": _FIELD_TYPES + [f"list<{t}>" for t in _FIELD_TYPES],
    }
    fields_list = {"type": "array", "minItems": 1, "items": _ref("Field")}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {
                        "code": {"type": "string", "enum": _ERROR_CODES},
                        "message": {"type": "string"},
                    },
                }
            },
        },
        "Base64": {
            "type": "object",
            "description": "Bytes in JSON.",
            "required": ["base64"],
            "additionalProperties": False,
            "properties": {"base64": {"type": "string", "contentEncoding": "base64"}},
        },
        "Key": {
            "description": "A key: its UTF-8 text, or base64 when it is not UTF-8.",
            "oneOf": [{"type": "string"}, _ref("Base64")],
        },
        "Field": {
            "type": "object",
            "required": ["name", "type"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                "type": field_type,
                "nullable": {"type": "boolean", "default": False},
                "default": {"description": "No default when null or absent; bytes as base64."},
                "dictionary": {"type": "boolean", "default": False},
            },
        },
        "Schema": {
            "type": "object",
            "required": ["version", "fields"],
            "properties": {"version": {"type": "integer", "minimum": 1}, "fields": fields_list},
        },
        "SchemaInput": {
            "type": "object",
            "description": (
                "A schema; without `version`, 1 at creation and the current version + 1 "
                "when evolving."
            ),
            "required": ["fields"],
            "additionalProperties": False,
            "properties": {"version": {"type": "integer", "minimum": 1}, "fields": fields_list},
        },
        "DatasetSummary": {
            "type": "object",
            "required": [
                "name",
                "kind",
                "epoch",
                "version",
                "records",
                "digest",
                "meta_revision",
                "queue",
                "merkle",
                "max_value_bytes",
            ],
            "properties": {
                "name": {"type": "string"},
                "kind": {"type": "string", "enum": ["typed", "opaque"]},
                "epoch": hex_epoch,
                "version": uint,
                "records": uint,
                "digest": {"type": "string", "pattern": "^[0-9a-f]+$"},
                "meta_revision": uint,
                "queue": {
                    "type": "object",
                    "required": ["floor", "entries", "max_entries", "policy"],
                    "properties": {
                        "floor": uint,
                        "entries": uint,
                        "max_entries": uint,
                        "policy": {"type": "string"},
                    },
                },
                "merkle": {
                    "type": "object",
                    "required": ["fanout", "depth"],
                    "properties": {"fanout": uint, "depth": uint},
                },
                "max_value_bytes": uint,
            },
        },
        "DatasetInfo": {
            "allOf": [
                _ref("DatasetSummary"),
                {
                    "type": "object",
                    "required": ["schema"],
                    "properties": {"schema": _nullable(_ref("Schema"))},
                },
            ]
        },
        "DatasetList": {
            "type": "object",
            "required": ["datasets"],
            "properties": {"datasets": {"type": "array", "items": _ref("DatasetSummary")}},
        },
        "CreateDataset": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "description": 'Typed: give "schema". Opaque: "opaque": true.',
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
                "schema": _ref("SchemaInput"),
                "opaque": {"type": "boolean", "default": False},
                "merkle": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "fanout": {"type": "integer", "enum": [2, 4, 8, 16, 32, 64, 128, 256]},
                        "depth": {"type": "integer", "minimum": 1},
                    },
                },
                "queue": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "max_entries": {"type": "integer", "minimum": 1},
                        "policy": {
                            "type": "string",
                            "enum": ["halving", "oldest-first", "binary-counter"],
                        },
                    },
                },
                "max_value_bytes": {"type": "integer", "minimum": 1},
                "compress": {"type": "boolean", "default": True},
            },
        },
        "Value": {
            "description": (
                "A typed record (an object of field values, bytes fields as "
                '{"base64": ...}) or an opaque value (a string, its UTF-8 bytes, '
                'or {"base64": ...}).'
            ),
            "oneOf": [{"type": "string"}, {"type": "object"}],
        },
        "Batch": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upserts": {
                    "type": "object",
                    "propertyNames": {"minLength": 1},
                    "additionalProperties": _ref("Value"),
                },
                "deletes": {"type": "array", "items": {"type": "string", "minLength": 1}},
            },
        },
        "Replace": {
            "type": "object",
            "required": ["records"],
            "additionalProperties": False,
            "properties": {
                "records": {
                    "type": "object",
                    "propertyNames": {"minLength": 1},
                    "additionalProperties": _ref("Value"),
                },
            },
        },
        "WriteResult": {
            "type": "object",
            "required": [
                "dataset",
                "epoch",
                "version",
                "digest",
                "upserted",
                "deleted",
                "unchanged",
            ],
            "properties": {
                "dataset": {"type": "string"},
                "epoch": hex_epoch,
                "version": uint,
                "digest": {"type": "string", "pattern": "^[0-9a-f]+$"},
                "upserted": uint,
                "deleted": uint,
                "unchanged": uint,
            },
        },
        "RecordResponse": {
            "type": "object",
            "required": ["key", "version"],
            "description": 'Typed datasets answer "record", opaque ones "value".',
            "properties": {
                "key": _ref("Key"),
                "version": uint,
                "record": {
                    "type": "object",
                    "description": (
                        'Field values; bytes as {"base64": ...}, non-finite floats as '
                        '"NaN", "Infinity" or "-Infinity".'
                    ),
                },
                "value": {"oneOf": [{"type": "string"}, _ref("Base64")]},
            },
        },
        "AckCursor": {
            "type": "object",
            "required": ["epoch", "version"],
            "additionalProperties": False,
            "properties": {"epoch": hex_epoch, "version": uint},
        },
        "Ack": {
            "type": "object",
            "required": ["replica"],
            "additionalProperties": False,
            "properties": {
                "replica": {"type": "string", "minLength": 1, "maxLength": 256},
                "datasets": {"type": "object", "additionalProperties": _ref("AckCursor")},
                "info": {"type": "object", "description": "Free-form, at most 64 KiB as JSON."},
            },
        },
        "Fleet": {
            "type": "object",
            "required": ["replicas"],
            "properties": {
                "replicas": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "replica",
                            "address",
                            "last_seen",
                            "age_seconds",
                            "datasets",
                            "info",
                        ],
                        "properties": {
                            "replica": {"type": "string"},
                            "address": {"type": "string"},
                            "last_seen": {"type": "number"},
                            "age_seconds": {"type": "number", "minimum": 0},
                            "datasets": {
                                "type": "object",
                                "additionalProperties": {
                                    "type": "object",
                                    "required": ["epoch", "version", "lag"],
                                    "properties": {
                                        "epoch": hex_epoch,
                                        "version": uint,
                                        "lag": _nullable(uint),
                                    },
                                },
                            },
                            "info": {"type": "object"},
                        },
                    },
                }
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "datasets"],
            "properties": {"status": {"type": "string", "enum": ["ok"]}, "datasets": uint},
        },
    }


_ERRORS: dict[str, tuple[str, str]] = {
    "400": ("BadRequest", "Malformed body or parameter, schema violation or bad schema."),
    "401": ("Unauthorized", "No or unknown bearer token."),
    "403": ("Forbidden", "A read token on a write endpoint."),
    "404": ("NotFound", "Unknown dataset or record."),
    "409": ("Conflict", "The dataset already exists."),
    "413": ("TooLarge", "The body is above the limit, or a value above the dataset's."),
    "415": ("UnsupportedMediaType", "A body that is neither JSON nor msgpack (nor a frame)."),
    "422": ("BadFrame", "A sync frame that fails its checksum or shape."),
    "507": ("StorageFull", "The store is full; nothing was written."),
}


def _responses() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in _ERRORS.values():
        response: dict[str, Any] = {
            "description": text,
            "content": {"application/json": {"schema": _ref("Error")}},
        }
        if name == "Unauthorized":
            response["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "required": True}
            }
        out[name] = response
    return out


def _errors(*codes: str) -> dict[str, Any]:
    return {code: {"$ref": "#/components/responses/" + _ERRORS[code][0]} for code in codes}


def _json_ok(schema: str, description: str, status: str = "200") -> dict[str, Any]:
    return {
        status: {
            "description": description,
            "content": {"application/json": {"schema": _ref(schema)}},
        }
    }


def _body(schema: str, *, msgpack: bool = True, required: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _ref(schema)}}
    if msgpack:
        content["application/msgpack"] = {
            "schema": _ref(schema),
            "description": "The same shape, keys and bytes as msgpack bin or str.",
        }
    return {"required": required, "content": content}


_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The dataset's name.",
}
_OPEN: list[dict[str, list[str]]] = []


def _paths() -> dict[str, Any]:
    read_errors = ("401",)
    write_errors = ("400", "401", "403", "404", "413", "415", "507")
    frame = {"schema": {"type": "string", "format": "binary"}}
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "Liveness.",
                "security": _OPEN,
                "responses": _json_ok("Health", "The origin is up."),
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics (text exposition format 0.0.4).",
                "security": _OPEN,
                "responses": {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "security": _OPEN,
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        "/v1/datasets": {
            "get": {
                "operationId": "listDatasets",
                "summary": "Every dataset, without schemas.",
                "responses": {**_json_ok("DatasetList", "The datasets."), **_errors(*read_errors)},
            },
            "post": {
                "operationId": "createDataset",
                "summary": "Create a dataset (typed with a schema, or opaque).",
                "requestBody": _body("CreateDataset"),
                "responses": {
                    "201": {
                        "description": "Created.",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": _ref("DatasetInfo")}},
                    },
                    **_errors("400", "401", "403", "409", "413", "415", "507"),
                },
            },
        },
        "/v1/datasets/{name}": {
            "parameters": [_NAME],
            "get": {
                "operationId": "getDataset",
                "summary": "One dataset, with its schema.",
                "responses": {**_json_ok("DatasetInfo", "The dataset."), **_errors("401", "404")},
            },
        },
        "/v1/datasets/{name}/schema": {
            "parameters": [_NAME],
            "put": {
                "operationId": "evolveSchema",
                "summary": "Evolve the schema (append-only: new nullable or defaulted fields).",
                "requestBody": _body("SchemaInput"),
                "responses": {**_json_ok("DatasetInfo", "Evolved."), **_errors(*write_errors)},
            },
        },
        "/v1/datasets/{name}/reset-history": {
            "parameters": [_NAME],
            "post": {
                "operationId": "resetHistory",
                "summary": "Drop the version queue and start a new epoch.",
                "responses": {
                    **_json_ok("DatasetInfo", "The dataset in its new epoch."),
                    **_errors("401", "403", "404", "413", "507"),
                },
            },
        },
        "/v1/datasets/{name}/batch": {
            "parameters": [_NAME],
            "post": {
                "operationId": "writeBatch",
                "summary": "Upsert and delete records as one version, durably.",
                "requestBody": _body("Batch"),
                "responses": {
                    **_json_ok("WriteResult", "Committed."),
                    **_errors(*write_errors),
                },
            },
        },
        "/v1/datasets/{name}/replace": {
            "parameters": [_NAME],
            "post": {
                "operationId": "replaceDataset",
                "summary": "Make the dataset exactly these records, as one version.",
                "requestBody": _body("Replace"),
                "responses": {
                    **_json_ok("WriteResult", "Committed."),
                    **_errors(*write_errors),
                },
            },
        },
        "/v1/datasets/{name}/records/{key}": {
            "parameters": [
                _NAME,
                {
                    "name": "key",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string"},
                    "description": "The key, URL-encoded (any bytes).",
                },
            ],
            "get": {
                "operationId": "getRecord",
                "summary": "One record's current value.",
                "responses": {
                    **_json_ok("RecordResponse", "The record."),
                    **_errors("401", "404"),
                },
            },
        },
        "/v1/sync": {
            "post": {
                "operationId": "sync",
                "summary": "One sync request frame in, one answer frame out (docs/protocol.md).",
                "description": (
                    "A SnapshotRequest with stream=true is answered with a sequence of "
                    "SnapshotChunk frames (chunked transfer encoding)."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/x-replicad-frame": frame},
                },
                "responses": {
                    "200": {
                        "description": "The answer frame(s).",
                        "content": {"application/x-replicad-frame": frame},
                    },
                    **_errors("401", "404", "413", "415", "422"),
                },
            },
        },
        "/v1/hints": {
            "get": {
                "operationId": "hints",
                "summary": "Server-sent events: each dataset's cursor now, then each new one.",
                "parameters": [
                    {
                        "name": "datasets",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Comma-separated dataset names (all when absent).",
                    },
                    {
                        "name": "diffs",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": ["0", "1"]},
                        "description": (
                            "1: a new version whose changes are small comes as "
                            "`event: diff` carrying them (a DiffPush frame, base64)."
                        ),
                    },
                ],
                "responses": {
                    "200": {
                        "description": (
                            '`event: hint` with `data: {"dataset", "epoch", "version", '
                            '"digest"}`; with `diffs=1` also `event: diff` whose data '
                            "is a base64 DiffPush frame (docs/protocol.md); and a "
                            "`: ping` comment every 15 seconds."
                        ),
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors("400", "401", "404"),
                },
            }
        },
        "/v1/ack": {
            "post": {
                "operationId": "ack",
                "summary": "A replica reports its cursors for the fleet view.",
                "requestBody": _body("Ack"),
                "responses": {
                    "204": {"description": "Recorded."},
                    **_errors("400", "401", "413", "415"),
                },
            }
        },
        "/v1/fleet": {
            "get": {
                "operationId": "fleet",
                "summary": "The newest ack of each replica, with its lag.",
                "responses": {**_json_ok("Fleet", "The fleet."), **_errors(*read_errors)},
            }
        },
    }


def build() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document, as a new JSON-able dict."""
    from replicad import __version__

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "replicad origin",
            "version": __version__,
            "description": (
                "Writers load feature datasets; replicas pull diffs, snapshots and Merkle "
                "answers and listen to hints. Errors are JSON: "
                '{"error": {"code", "message"}}. A rejected write applies nothing.'
            ),
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A write token (everything) or a read token (reads, sync).",
                }
            },
            "schemas": _schemas(),
            "responses": _responses(),
        },
    }
