"""JSON integers as JSON Schema reads them, for the strict pydantic models of our wire protocols.

JSON Schema counts 1.0 as an integer, and clients generated from an OpenAPI spec (and fuzzers)
may send it; strict pydantic alone would refuse it. These take a whole float and still refuse
true, "1" and 1.5. (The bounds come before the validator, so the spec still shows them.)
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field


def _whole(value: object) -> object:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JsonInt = Annotated[int, Field(strict=True), BeforeValidator(_whole)]
PositiveInt = Annotated[int, Field(ge=1, strict=True), BeforeValidator(_whole)]
NonNegativeInt = Annotated[int, Field(ge=0, strict=True), BeforeValidator(_whole)]
