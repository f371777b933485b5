"""Strict pydantic sections, and validation errors that name the key, the value and what is allowed.

The machinery behind :mod:`tlpipe.core.config`: it knows nothing of the pipeline's
settings, only how a section refuses unknown keys and YAML booleans, and how
pydantic's errors become one readable line per key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

# the words PyYAML reads as booleans (in any case)
_YAML_BOOLEAN_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}


class Section(BaseModel):
    """A params section: frozen, no NaN or infinity, no unknown keys, no YAML booleans for non-booleans."""

    # forbid: an unknown key is almost always a typo that would otherwise be ignored silently
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: object, info: ValidationInfo) -> object:
        # YAML reads yes/no/on/off/true/false as booleans, and pydantic would take True as the number 1
        if not isinstance(value, bool):
            return value
        assert info.field_name is not None  # a "*" field validator always runs for a named field
        annotation = cls.model_fields[info.field_name].annotation
        if bool in _members(annotation):
            return value
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return value  # a section: pydantic says it wants a mapping
        # `mixed_precision: off`, as the comment in params.yaml says: the word was meant, not False
        word = next((w for w in _YAML_BOOLEAN_WORDS[value] if w in _literal_values(annotation)), None)
        if word is not None:
            return word
        # ValueError, not TypeError: pydantic turns only ValueError into a validation error
        raise ValueError(
            f"expected {describe_type(annotation)}, not a boolean "
            "(YAML reads yes/no/on/off/true/false as booleans: quote a word)"
        )


def _members(annotation: object) -> list[object]:
    """The alternatives of a type: ``int | Literal['all']`` -> [int, Literal['all']] (Annotated unwrapped)."""
    if get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if get_origin(annotation) in (Union, type(int | None)):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _literal_values(annotation: object) -> list[object]:
    return [v for m in _members(annotation) if get_origin(m) is Literal for v in get_args(m)]


def describe_type(annotation: object) -> str:
    """What a field takes, in words, e.g. "an integer or 'all'"."""
    names: dict[object, str] = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "text",
        type(None): "null",
    }
    parts = []
    for member in _members(annotation):
        if get_origin(member) is Literal:
            parts.append("one of " + ", ".join(repr(v) for v in get_args(member)))
        elif get_origin(member) is list:
            parts.append("a list")
        else:
            parts.append(names.get(member, getattr(member, "__name__", str(member))))
    return " or ".join(parts)


def format_errors(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line per invalid key of ``root``, under a header naming ``source`` and how many there are."""
    # pydantic reports a value that fits no member of a union once per member: one line per key here
    by_key: dict[str, list[Any]] = {}
    for e in err.errors():
        by_key.setdefault(_dotted_key(e["loc"], root), []).append(e)
    lines = [f"{source}: {len(by_key)} invalid setting(s):"]
    for key, errors in by_key.items():
        first = errors[0]
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(first["loc"][:-1], root)
            lines.append(f"  {key}: unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        # "Input should be a valid integer; or 'all'": what each member of the union allows
        alternatives = [errors[0]["msg"], *(e["msg"].removeprefix("Input should be ") for e in errors[1:])]
        message = "; or ".join(alternatives).removeprefix("Value error, ")
        value = first.get("input")
        # a check across keys (a section-level validator) names its values itself: no section dump
        shown = "" if isinstance(value, dict) and first["type"] == "value_error" else f" (got {value!r})"
        lines.append(f"  {key}: {message}{shown}")
    return "\n".join(lines)


def _dotted_key(loc: tuple[int | str, ...], root: type[BaseModel]) -> str:
    """The params key an error is about, without pydantic's union-member tags (``literal['all']``)."""
    parts: list[str] = []
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):  # a list index, e.g. data.classes.0
            parts.append(str(part))
            continue
        if model is None or part not in model.model_fields:
            if model is None:  # inside a leaf: a union member's tag, not a key
                continue
            parts.append(str(part))  # an unknown key
            break
        parts.append(part)
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return ".".join(parts) or "(top level)"


def _allowed_keys(loc: tuple[int | str, ...], root: type[BaseModel]) -> list[str]:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type):
            break
        if not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)
