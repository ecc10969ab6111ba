"""The `parsed` column of a job with sampling.json_schema: each answer's JSON value, typed by the schema, so that
the next program reads `{"impression": ..., "urgent": true}` as a struct (a dict in pandas), not text to parse.

Types follow the schema: an object with properties is a struct of them, an array of items a list, a string a string, an integer int64, a number float64, a boolean a bool; any other part of a schema
(anyOf, $ref, an object without properties, ...) is a string holding that value as JSON text. With
output.expand_json=true the top-level properties are columns of their own instead.
"""

import json

import pyarrow as pa

from splitwiser.errors import UserError

SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def arrow_type(schema: dict) -> pa.DataType:
    """The Arrow type of the values a JSON schema allows (JSON text where the schema is not one of the simple kinds)."""
    kind = schema.get("type")
    if kind == "object" and isinstance(schema.get("properties"), dict):
        return pa.struct([(name, arrow_type(sub)) for name, sub in schema["properties"].items()])
    if kind == "array" and isinstance(schema.get("items"), dict):
        return pa.list_(arrow_type(schema["items"]))
    return SCALARS.get(kind, pa.string())


def _value(value, schema: dict, type_: pa.DataType):
    """A JSON value as arrow_type(schema) takes it."""
    if value is None:
        return None
    if pa.types.is_struct(type_):
        return {name: _value(value.get(name), schema["properties"][name], type_.field(name).type) for name in
                schema["properties"]}
    if pa.types.is_list(type_):
        return [_value(item, schema["items"], type_.value_type) for item in value]
    if type_ == pa.string() and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return value


def parsed_column(answers: list[str | None], schema: dict) -> pa.Array:
    """The answers (JSON text; None where a row has none) as values of arrow_type(schema)."""
    type_ = arrow_type(schema)
    return pa.array([None if text is None else _value(json.loads(text), schema, type_) for text in answers], type_)


def with_parsed(generations: pa.Table, schema: dict, expand: bool) -> pa.Table:
    """generations with the `parsed` column (or, expand: a column per top-level property)."""
    column = parsed_column(generations["generation"].to_pylist(), schema)
    if not expand:
        return generations.append_column("parsed", column)
    for field in column.type:
        generations = generations.append_column(field.name, column.field(field.name))
    return generations


def check_expand(schema: dict, taken: list[str]) -> None:
    """output.expand_json=true: refuses a schema whose top-level properties are not an object's, or clash with the
    columns generations.parquet has already (taken)."""
    if not pa.types.is_struct(arrow_type(schema)):
        raise UserError("output.expand_json=true: the schema's top level is not an object with properties")
    clash = [name for name in schema["properties"] if name in taken]
    if clash:
        raise UserError(f"output.expand_json=true: the schema's properties {clash} are names generations.parquet has "
                        "already; set output.expand_json=false (the `parsed` column)")
