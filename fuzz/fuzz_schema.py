"""Fuzz harness: schema definitions (``replicad/schema.py``).

The first input byte picks the encoding of the rest: JSON (as ``POST
/v1/datasets`` bodies arrive by default) or msgpack (the bulk API, where
defaults may be bin and keys need not be strings). The document is a schema,
a field, or a list of two schemas (an evolution). Checks:
``Schema.from_json`` / ``Field.from_json`` / ``Schema.check_evolution`` return
or raise :class:`~replicad.errors.SchemaError` only, and a schema they accept
round-trips through ``to_json`` unchanged.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from fuzz import driver

with driver.instrumented(__name__ == "__main__" and driver.atheris_wanted()):
    import msgpack

    from replicad.errors import SchemaError
    from replicad.schema import Field, Schema


def _doc(data: bytes) -> tuple[bool, Any]:
    """``(ok, document)``: the HTTP layer refuses undecodable bodies itself."""
    try:
        if data[0] % 2 == 0:
            return True, json.loads(data[1:])
        return True, msgpack.unpackb(data[1:], raw=False, strict_map_key=False)
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
        return False, None


def one_input(data: bytes) -> None:
    if not data:
        return
    ok, doc = _doc(data)
    if not ok:
        return
    try:
        if isinstance(doc, list) and len(doc) == 2:
            old, new = Schema.from_json(doc[0]), Schema.from_json(doc[1])
            Schema.check_evolution(old, new)
            return
        if isinstance(doc, dict) and "fields" not in doc and "version" not in doc:
            Field.from_json(doc)
            return
        schema = Schema.from_json(doc)
    except SchemaError:
        return
    text = json.dumps(schema.to_json(), sort_keys=True)
    back = Schema.from_json(json.loads(text))
    if json.dumps(back.to_json(), sort_keys=True) != text:
        raise driver.FuzzFindingError(f"schema does not round-trip: {text}")


def seeds() -> list[bytes]:
    v1: dict[str, Any] = {
        "version": 1,
        "fields": [
            {"name": "age", "type": "int", "default": 3},
            {"name": "city", "type": "str", "dictionary": True, "nullable": True},
            {"name": "pic", "type": "bytes", "default": "AAEC"},
            {"name": "tags", "type": "list<float32>", "nullable": True, "default": [1.5]},
        ],
    }
    v2 = {"version": 2, "fields": [*v1["fields"], {"name": "x", "type": "bool", "default": False}]}
    docs: list[Any] = [v1, [v1, v2], v1["fields"][0]]
    out = [b"\x00" + json.dumps(d).encode() for d in docs]
    out += [b"\x01" + msgpack.packb(d, use_bin_type=True) for d in docs]
    return out


SEEDS = seeds()

if __name__ == "__main__":
    sys.exit(driver.main("fuzz_schema", one_input, SEEDS))
