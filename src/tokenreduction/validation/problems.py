"""Config problems: the error types, their message format, and JSON-schema
violations as (key path, message)."""
from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
    """One or more config problems; ``problems`` is a list of (key path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(format_problems(problems))


def format_problems(problems: list[tuple[str, str]]) -> str:
    if len(problems) == 1:
        key, message = problems[0]
        return f"invalid config at {key}: {message}"
    lines = [f"invalid config ({len(problems)} problems):"]
    lines += [f"  at {key}: {message}" for key, message in problems]
    return "\n".join(lines)


class ValidatorError(RuntimeError):
    """A config check itself failed (a bug in the validator): the DAG build stops."""


def _close(word: str, known: Iterable[str]) -> str:
    import difflib

    match = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def schema_problems(config: dict, schema: dict) -> list[tuple[str, str]]:
    """JSON-schema violations as (key path, message), key paths like
    ``datasets.imagenet.kind`` and ``experiments[0].keep_rates[1]``."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path]):
        leaves = [err]
        if err.validator in ("oneOf", "anyOf") and err.context:
            leaves = [min(err.context, key=lambda e: len(list(e.absolute_path)))]
        for leaf in leaves:
            path = ""
            for part in leaf.absolute_path:
                path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
            message = leaf.message
            if leaf.validator == "additionalProperties":
                allowed = sorted((leaf.schema.get("properties") or {}))
                extra = [p for p in (leaf.instance or {}) if p not in allowed]
                if extra:
                    path = f"{path}.{extra[0]}" if path else extra[0]
                    message = f"unknown key{_close(extra[0], allowed)}; allowed here: {', '.join(allowed)}"
            problems.append((path or "(top level)", message))
    return problems
