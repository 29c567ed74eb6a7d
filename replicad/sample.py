"""A seed-like feature dataset: one user profile schema and deterministic records.

The seed documents describe feature records of a few dozen features per
entity: counters, rates, scores, a few categorical strings, flags.
:func:`seed_like_schema` is such a schema (27 features of a user profile: ints,
float64s, float32s, short strings, three dictionary-encoded strings, bools, a
small int list) and :func:`seed_like_record` makes record ``i`` of it. Tests,
benchmarks and the README demo all use these, so the figures they report are
about the same data.

Records are a pure function of ``i``: each call builds its own
``random.Random(i)`` (no global randomness, no I/O). The float values are
rounded to a few decimals, as a feature pipeline writing JSON would emit them,
so ``json.dumps(record)`` is a fair size anchor (380-420 characters in
compact form, about 400 on average). Fields typed ``float32`` come back from the codec rounded to
single precision.
"""

from __future__ import annotations

import random
from typing import Any

from replicad.schema import Field, FieldType, Schema

_CITIES = (
    "beijing",
    "shanghai",
    "guangzhou",
    "shenzhen",
    "chengdu",
    "hangzhou",
    "wuhan",
    "xian",
    "nanjing",
    "chongqing",
    "tianjin",
    "suzhou",
    "singapore",
    "jakarta",
)
_COUNTRIES = ("CN", "CN", "CN", "CN", "CN", "CN", "SG", "ID", "US", "MY")

_I = FieldType.INT
_F = FieldType.FLOAT
_F32 = FieldType.FLOAT32
_S = FieldType.STR
_B = FieldType.BOOL


def seed_like_schema() -> Schema:
    """The user-profile schema (version 1, 27 fields) of :func:`seed_like_record`.

    Three low-cardinality strings are dictionary-encoded (``gender``, ``city``,
    ``os``); ``country`` defaults to ``"CN"``; ``churn`` is a nullable float32;
    ``ltv`` and ``aov`` are float64; ``tags`` is a ``list<int>``.
    """
    fields = (
        Field("age", _I),
        Field("gender", _S, dictionary=True),
        Field("city", _S, dictionary=True),
        Field("country", _S, default="CN"),
        Field("os", _S, dictionary=True),
        Field("ctr_7d", _F32),
        Field("ctr_30d", _F32),
        Field("cvr_7d", _F32),
        Field("cvr_30d", _F32),
        Field("dwell", _F32),
        Field("pref", _F32),
        Field("novelty", _F32),
        Field("churn", _F32, nullable=True),
        Field("ltv", _F),
        Field("aov", _F),
        Field("clk_7d", _I),
        Field("clk_30d", _I),
        Field("imp_7d", _I),
        Field("imp_30d", _I),
        Field("ord_30d", _I),
        Field("ord_1y", _I),
        Field("sess_7d", _I),
        Field("tenure", _I),
        Field("last_active_ts", _I),
        Field("is_vip", _B, default=False),
        Field("push_on", _B, default=True),
        Field("tags", _I, is_list=True, default=()),
    )
    return Schema(1, fields)


def seed_like_record(i: int) -> dict[str, Any]:
    """Record ``i`` of the seed-like dataset: a new dict, the same for the same ``i``.

    Every field of :func:`seed_like_schema` is present. Raises nothing.
    """
    rng = random.Random(i)
    imp_30d = rng.randrange(50, 20_000)
    imp_7d = imp_30d // 4 + rng.randrange(0, 50)
    clk_30d = int(imp_30d * rng.uniform(0.005, 0.08))
    clk_7d = clk_30d // 4
    ord_30d = rng.randrange(0, 12)
    return {
        "age": rng.randrange(16, 80),
        "gender": rng.choice(("m", "f", "u")),
        "city": rng.choice(_CITIES),
        "country": rng.choice(_COUNTRIES),
        "os": rng.choice(("android", "ios")),
        "ctr_7d": round(clk_7d / max(imp_7d, 1), 4),
        "ctr_30d": round(clk_30d / imp_30d, 4),
        "cvr_7d": round(rng.uniform(0, 0.05), 4),
        "cvr_30d": round(rng.uniform(0, 0.05), 4),
        "dwell": round(rng.uniform(2, 180), 1),
        "pref": round(rng.random(), 3),
        "novelty": round(rng.random(), 3),
        "churn": None if rng.random() < 0.2 else round(rng.random(), 3),
        "ltv": round(rng.uniform(0, 5000), 2),
        "aov": round(rng.uniform(5, 300), 2),
        "clk_7d": clk_7d,
        "clk_30d": clk_30d,
        "imp_7d": imp_7d,
        "imp_30d": imp_30d,
        "ord_30d": ord_30d,
        "ord_1y": ord_30d * 6 + rng.randrange(0, 40),
        "sess_7d": rng.randrange(0, 60),
        "tenure": rng.randrange(1, 3650),
        "last_active_ts": 1_700_000_000 + rng.randrange(0, 40_000_000),
        "is_vip": rng.random() < 0.1,
        "push_on": rng.random() < 0.7,
        "tags": sorted(rng.sample(range(1, 400), rng.randrange(2, 6))),
    }
