"""The base of every configuration type, and its one error.

`Section` is a frozen pydantic model that refuses unknown keys and checks its types strictly (no string read
as a number, no boolean as a count); each config section states its own rules on its fields (`Field(ge=..)`,
`Literal`) and in its validators. The shared value types: `Count` (an integer; a count given as 1e5 is taken
as 100000), `Number` (finite; an integer is a number), `Name` (one path segment). `Section.from_dict` reads
YAML data and turns every problem pydantic found into one `ConfigError` that names each bad key by its path
(`certifiers[0].sigma`, `dataset.size`), all at once.

A validator's message names its key through `{where}`, the path of the value it checks (`"{where} must be
..."`, `"{where}.size (the centre-crop side) ..."`); a message without it is put after `where: `.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, AllowInfNan, BaseModel, BeforeValidator, ConfigDict, ValidationError

__all__ = ["ConfigError", "Count", "Listed", "Name", "Number", "Section", "config_error", "is_name", "whole"]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names every bad key."""


def whole(value: Any) -> Any:
    """A float with no fraction (YAML's 1e5) as the integer it is; anything else unchanged for the type check."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def is_name(value) -> bool:
    """True for a name that may become one path segment (a run id, a sweep or training name): letters, digits,
    '.', '_' and '-', starting with a letter or digit, so never '.', '..', hidden, or a path."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def _name(value: str) -> str:
    if not is_name(value):
        raise ValueError(f"{{where}} must be letters, digits, '.', '_' or '-', starting with a letter or digit (it "
                         f"becomes a folder name), got {value!r}")
    return value


def _listed(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


Count = Annotated[int, BeforeValidator(whole)]  # with Field(ge=..) for the least count
Number = Annotated[float, AllowInfNan(False)]
Name = Annotated[str, AfterValidator(_name)]
Listed = BeforeValidator(_listed)  # a YAML list as the tuple a frozen section holds: Annotated[tuple[..], Listed]


class Section(BaseModel):
    """A frozen config section: unknown keys refused, types checked strictly, rules on the fields."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True)
    unknown_keys: ClassVar[str] = "unknown key(s)"  # the message for unknown keys at the top of a config

    @classmethod
    def from_dict(cls, data: Any):
        """The section from YAML data; ConfigError naming every bad key."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise config_error(error, cls) from None

    def to_dict(self) -> dict[str, Any]:
        """The section as plain data (YAML / JSON); `from_dict` reads it back."""
        return self.model_dump(mode="json")


LIMITS = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
          "less_than": ("lt", "<")}
TYPES = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
         "finite_number": "a finite number", "bool_type": "true or false", "string_type": "a string",
         "list_type": "a list", "tuple_type": "a list", "dict_type": "a mapping", "model_type": "a mapping"}


def _path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _message(where: str, error: dict) -> str:
    kind, context, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind in ("value_error", "assertion_error"):
        text = str(context.get("error", error["msg"]))
        if "{where}" in text:
            return text.replace("{where}.", f"{where}." if where else "").replace("{where}", where)
        return f"{where}: {text}" if where else text
    if kind in LIMITS:
        key, sign = LIMITS[kind]
        limit = context[key]
        noun = "an integer" if isinstance(limit, int) and isinstance(value, int) else "a number"
        return f"{where} must be {noun} {sign} {limit:g}, got {value!r}"
    if kind == "literal_error":
        return f"{where} must be one of {context['expected']}, got {value!r}"
    if kind in TYPES:
        return f"{where} must be {TYPES[kind]}, got {value!r}"
    if kind == "missing":
        return f"{where}: required, but not given"
    return f"{where}: {error['msg']}, got {value!r}"


def _fields_at(kind: type, loc: tuple) -> list[str]:
    """The keys of the section at `loc` under the config type `kind` (for the list of known keys)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = kind.model_fields.get(part) if isinstance(kind, type) and issubclass(kind, BaseModel) else None
        kind = _model_in(field.annotation) if field else None
        if kind is None:
            return []
    return sorted(kind.model_fields)


def _model_in(annotation: Any) -> type | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _model_in(argument)
        if found is not None:
            return found
    return None


def config_error(error: ValidationError, kind: type[Section]) -> ConfigError:
    """Every problem of a ValidationError of the config type `kind` as one ConfigError: a line per bad key,
    named by its path; unknown keys of one section together, with the section's known keys."""
    unknown: dict[tuple, list[str]] = {}
    lines = []
    for item in error.errors(include_url=False):
        if item["type"] == "extra_forbidden":
            unknown.setdefault(item["loc"][:-1], []).append(str(item["loc"][-1]))
        else:
            lines.append(_message(_path(item["loc"]), item))
    for parent, keys in unknown.items():
        where = _path(parent)
        head = f"{where}: unknown key(s)" if where else kind.unknown_keys
        lines.append(f"{head} {sorted(keys)}; known: {_fields_at(kind, parent)}")
    if len(lines) == 1:
        return ConfigError(lines[0])
    return ConfigError(f"{len(lines)} problems:\n" + "\n".join(f"- {line}" for line in lines))
