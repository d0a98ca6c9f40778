"""The payload TypedDicts in ``rungate.types`` against the JSON Schemas in
spec/: for every command and push in the index ``spec/v1/commands.json``,
the Python class's required keys are the definition's ``required`` and its
optional keys the rest of its ``properties``; the enums the client spells
out (capabilities, outcomes, run states, error codes) are the spec's.

``RUNGATE_SPEC`` points at another spec/ directory (a branch's) if set.
"""

from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Any

import pytest

from harness import SPEC
from rungate import errors, types

SPEC_DIR = Path(os.environ.get("RUNGATE_SPEC") or SPEC)
V1 = SPEC_DIR / "v1"

def load(ref: str) -> dict[str, Any]:
    """The definition a reference relative to spec/v1/ names."""
    file, _, pointer = ref.partition("#")
    doc: Any = json.loads((V1 / file).read_text())
    for part in pointer.strip("/").split("/"):
        if part:
            doc = doc[part]
    assert isinstance(doc, dict)
    return doc


INDEX = json.loads((V1 / "commands.json").read_text())


def keys_of(cls: Any) -> tuple[set[str], set[str]]:
    return set(cls.__required_keys__), set(cls.__optional_keys__)


def check(cls: Any, definition: dict[str, Any], name: str) -> None:
    props = set(definition.get("properties", {}))
    required = set(definition.get("required", []))
    assert definition.get("additionalProperties") is False, f"{name} is strict in spec/"
    py_required, py_optional = keys_of(cls)
    assert py_required == required, f"{name}: required {sorted(py_required)} != spec {sorted(required)}"
    assert py_optional == props - required, f"{name}: optional {sorted(py_optional)} != spec {sorted(props - required)}"


def command_cases() -> list[tuple[str, str]]:
    return [(c, side) for c in sorted(set(INDEX["commands"]) | set(types.COMMANDS)) for side in ("request", "response")]


@pytest.mark.parametrize("command,side", command_cases())
def test_command_payload_types_match_the_schema(command: str, side: str) -> None:
    assert command in INDEX["commands"], f"rungate.types has {command}; spec/ does not"
    assert command in types.COMMANDS, f"spec/ has {command}; rungate.types does not"
    request, response = types.COMMANDS[command]
    cls = request if side == "request" else response
    check(cls, load(INDEX["commands"][command][side]), f"{command} {side} ({cls.__name__})")


@pytest.mark.parametrize("push", sorted(set(INDEX["pushes"]) | set(types.PUSHES)))
def test_push_payload_types_match_the_schema(push: str) -> None:
    assert push in INDEX["pushes"], f"rungate.types has push {push}; spec/ does not"
    assert push in types.PUSHES, f"spec/ has push {push}; rungate.types does not"
    cls = types.PUSHES[push]
    check(cls, load(INDEX["pushes"][push]["payload"]), f"{push} ({cls.__name__})")


NESTED_REFS = {
    "ErrorBody": "schemas/frames/envelope.json#/$defs/ErrorBody",
    "OutputEvent": "schemas/events/output-event.json#/$defs/OutputEvent",
    "StreamEvent": "schemas/frames/pushes.json#/$defs/StreamEvent",
    "RunSummary": "schemas/commands/stream.json#/$defs/RunSummary",
}


@pytest.mark.parametrize("name", sorted(types.NESTED))
def test_nested_types_match_the_schema(name: str) -> None:
    definition = load(NESTED_REFS[name])
    if name == "ErrorBody":
        definition = {**definition, "additionalProperties": False}  # envelope may be open
    check(types.NESTED[name], definition, name)


def literals(alias: Any) -> set[str]:
    return set(typing.get_args(alias))


def test_enums_match_the_schema() -> None:
    caps = load("schemas/commands/runtime-session.json#/$defs/RuntimeCapability")["enum"]
    assert literals(types.Capability) == set(caps)
    states = set(load("schemas/commands/stream.json#/$defs/RunSummary")["properties"]["state"]["enum"])
    codes = set(load("schemas/frames/envelope.json#/$defs/ErrorCode")["enum"])
    assert literals(types.Outcome) == set(load("schemas/commands/lifecycle.json#/$defs/RunOutcome")["enum"])
    assert literals(types.RunState) == states
    assert set(errors._BY_CODE) == codes


def test_the_index_is_covered_both_ways() -> None:
    spec_commands = set(INDEX["commands"])
    spec_pushes = set(INDEX["pushes"])
    assert set(types.COMMANDS) == spec_commands
    assert set(types.PUSHES) == spec_pushes
