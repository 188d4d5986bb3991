"""Tool calls in /v1/chat/completions: OpenAI's ``tools`` and ``tool_choice``, answered by
constrained decoding (graft/generation/constrain.py), as vLLM answers a named or required choice.

The tools go to the chat template (its ``tools`` variable, as transformers renders it). With
``tool_choice`` naming a function, the reply is constrained to that function's parameters (a
JSON schema) and becomes one call; with ``"required"``, to a JSON list of calls, each
``{"name": one of the tools, "parameters": its arguments}`` (vLLM's form; one call when
``parallel_tool_calls`` is false); with ``"none"``, the model answers in text. ``"auto"`` (OpenAI's
default when tools are given) would need this model family's own format for calls, parsed out of
free text: refused with a 422 that says which choices work.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import Field

from graft.serve.http import Body, HTTPError


class Function(Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="A JSON schema of the arguments.",
    )
    strict: bool | None = Field(None, description="Accepted: the arguments always match the schema.")


class Tool(Body):
    type: Literal["function"]
    function: Function


class Named(Body):
    name: str


class NamedChoice(Body):
    type: Literal["function"]
    function: Named


ToolChoice = Literal["none", "auto", "required"] | NamedChoice


class CallFunction(Body):
    name: str
    arguments: str = Field(description="The arguments as a JSON text.")


class Call(Body):
    """A call the assistant made earlier in the conversation (sent back in its message)."""

    id: str
    type: Literal["function"] = "function"
    function: CallFunction


def for_template(tools: list[Tool]) -> list[dict[str, Any]]:
    """The tools as chat templates read them (transformers' form: OpenAI's, without None fields)."""
    return [tool.model_dump(exclude_none=True) for tool in tools]


def call_for_template(call: Call) -> dict[str, Any]:
    """An earlier call as chat templates read it: arguments as an object where they parse (templates
    write them with ``tojson``), else the text as sent."""
    try:
        arguments: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }


class Calling:
    """How this request's reply becomes tool calls: the schema it is constrained to, and the calls
    read back from its text."""

    def __init__(self, tools: list[Tool], choice: Any, parallel: bool | None) -> None:
        self.tools = {tool.function.name: tool.function for tool in tools}
        if len(self.tools) < len(tools):
            raise HTTPError(422, "tools: two tools have the same name", "tools")
        self.named: str | None = None
        if isinstance(choice, NamedChoice):
            self.named = choice.function.name
            if self.named not in self.tools:
                known = ", ".join(self.tools) or "none"
                raise HTTPError(
                    422, f"tool_choice: no tool is named {self.named!r} (tools: {known})", "tool_choice"
                )
        self.parallel = parallel is not False

    def schema(self) -> dict[str, Any]:
        """The JSON schema the reply is constrained to."""
        if self.named is not None:
            return self.tools[self.named].parameters
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": function.parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, function in self.tools.items()
        ]
        return {
            "type": "array",
            "minItems": 1,
            **({} if self.parallel else {"maxItems": 1}),
            "items": {"anyOf": calls},
        }

    def calls(self, text: str) -> list[dict[str, Any]]:
        """OpenAI's ``tool_calls`` from the reply's text (complete: it ended as the schema allows)."""
        if self.named is not None:
            return self.partial(text)  # the arguments as the model wrote them
        return [call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in json.loads(text)]

    def partial(self, text: str) -> list[dict[str, Any]]:
        """The named function's call with ``text`` as its arguments (all of them, or as far as they came)."""
        return [call(self.named or "", text)]


def call(name: str, arguments: str) -> dict[str, Any]:
    """One of OpenAI's ``tool_calls``: a new id, the function's name, its arguments (a JSON text)."""
    return {
        "id": "chatcmpl-tool-" + uuid.uuid4().hex,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def calling(tools: list[Tool] | None, choice: Any, parallel: bool | None) -> Calling | None:
    """The request's tool calling (None: the reply is text), or a 422 for a choice graft cannot keep."""
    if choice is not None and not tools and choice != "none":
        raise HTTPError(422, "tool_choice: only with tools", "tool_choice")
    if not tools or choice == "none":
        return None
    if choice is None or choice == "auto":
        raise HTTPError(
            422,
            'tool_choice: "auto" (the default with tools) needs this model\'s own format for calls, '
            'which graft does not read; send "required" or {"type": "function", "function": {"name": ...}} '
            '(the reply is then constrained to the call), or "none"',
            "tool_choice",
        )
    return Calling(tools, choice, parallel)
