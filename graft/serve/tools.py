"""Tool calls in /v1/chat/completions: OpenAI's ``tools`` and ``tool_choice``, answered by
constrained decoding (graft/generation/constrain.py).

The tools go to the chat template (its ``tools`` variable, as transformers renders it). With
``tool_choice`` naming a function, the reply is constrained to that function's parameters (a
JSON schema) and becomes one call (its arguments streamed as they come); with ``"none"``, the
model answers in text.

With ``"auto"`` (OpenAI's default when tools are given) the model decides, in its family's own
format for calls (``FORMATS``: Hermes/Qwen's ``<tool_call>`` blocks, Llama 3's bare JSON,
Mistral's ``[TOOL_CALLS]`` list), which graft knows from the chat template (or ``graft serve
--tool-format``). The reply is free text until the model writes the format's marker; from there
on a grammar holds it to calls of the given tools (llguidance's lazy lexemes, the "lazy grammar"
llama.cpp uses), so a call the model starts always parses, names a tool and matches its schema;
a call ends the reply. Text before the marker is the message's content. ``"required"`` is the
same grammar without the text: calls alone, in the format the model was trained to write; where
graft knows no format, a JSON list of ``{"name": one of the tools, "parameters": its arguments}``
(vLLM's form). ``parallel_tool_calls: false``: one call at most.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
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


# Between a call's JSON tokens, as graft.generation.constrain.WHITESPACE: at most one line break
# and some indentation (a random model wrote line breaks until max_tokens otherwise).
WHITESPACE = {"whitespace_pattern": r"(\r?\n)?[ \t]{0,24}"}
# Lark: any text (special tokens are not text: only a rule that names one takes it), and the
# whitespace between a format's pieces (as WHITESPACE: a random model wrote "\r" until max_tokens)
RULES = "TEXT: /(.|\\n)*/\nWS: /[ \\t]{1,24}|[ \\t]{0,24}\\r?\\n[ \\t]{0,24}/\n"

Token = Callable[[str], str | None]  # a marker's text -> the Lark of its own token (<[id]>), or None


class CallFormat:
    """How one model family writes tool calls in its replies: ``marker`` begins them (its chat
    template names it, and so does ``detects``); ``grammar`` is the Lark of a whole reply (text, or
    text then calls), ``split`` cuts a reply at its calls, ``parse`` reads them, ``held`` is how much
    of a streamed reply's end may still become a marker."""

    name: str
    marker: str
    key = "arguments"  # a call's arguments, in the model's JSON

    def detects(self, template: str) -> bool:
        return self.marker in template

    def call_schema(self, tools: dict[str, Function]) -> dict[str, Any]:
        """A JSON schema of one call: ``{"name": a tool, key: its arguments}``."""
        return {"anyOf": call_schemas(tools, self.key), "x-guidance": WHITESPACE}

    def grammar(self, tools: dict[str, Function], parallel: bool, token: Token, text: bool = True) -> str:
        """The Lark of a reply: text, or (text then) calls of ``tools`` (one if not ``parallel``);
        without ``text``, calls alone (tool_choice "required")."""
        raise NotImplementedError

    def split(self, text: str) -> tuple[str, str | None]:
        """The reply's text before its calls, and the calls' text from the marker (None: no calls)."""
        at = text.find(self.marker)
        return (text, None) if at < 0 else (text[:at], text[at:])

    def parse(self, calls: str) -> list[tuple[str, Any]]:
        """The (name, arguments) of each call in ``calls`` (from ``split``); ValueError where it does
        not read as this format's calls."""
        raise NotImplementedError

    def sure(self, text: str) -> tuple[int, bool]:
        """How much of a reply streamed so far is surely content (what may still become a marker is
        held back), and whether its calls have begun."""
        said, calls = self.split(text)
        return (len(said), True) if calls is not None else (len(text) - self.held(text), False)

    def held(self, text: str) -> int:
        """How many characters at the end of ``text`` (no marker in it yet) may begin the marker."""
        return next((n for n in range(min(len(text), len(self.marker) - 1), 0, -1)
                     if self.marker.startswith(text[-n:])), 0)  # fmt: skip


def call_schemas(tools: dict[str, Function], key: str) -> list[dict[str, Any]]:
    """Each tool's call as a JSON schema: ``{"name": the tool's, key: its arguments}``, nothing else."""
    return [
        {
            "type": "object",
            "properties": {"name": {"const": name}, key: function.parameters},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for name, function in tools.items()
    ]


def either(text: str, token: Token) -> str:
    """Lark for a marker: its text, or its own token where the vocabulary has one (a special
    token: text cannot spell it)."""
    ref = token(text)
    return json.dumps(text) if ref is None else f"({json.dumps(text)} | {ref})"


def text_then(text: str, token: Token) -> tuple[str, str]:
    """Lark for any text and then the marker ``text``: the expression, and the rule it needs (the
    text ends where the marker is first written, a lazy lexeme, or at the marker's own token)."""
    ref = token(text)
    return ("head" if ref is None else f"(head | TEXT {ref})"), f"head[lazy]: TEXT {json.dumps(text)}\n"


def read_call(value: Any, key: str) -> tuple[str, Any]:
    if not (
        isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get(key), dict)
    ):
        raise ValueError(f'a call is {{"name": ..., "{key}": {{...}}}}')
    return value["name"], value[key]


class Hermes(CallFormat):
    """``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block a call, after
    any text: Hermes 2 Pro and 3, Qwen 2.5 and 3, SmolLM3 (the format vLLM calls hermes)."""

    name, marker = "hermes", "<tool_call>"

    def grammar(self, tools: dict[str, Function], parallel: bool, token: Token, text: bool = True) -> str:
        call = f"WS? %json {json.dumps(self.call_schema(tools))} WS? {either('</tool_call>', token)}"
        more = f"(WS? {either(self.marker, token)} {call})*" if parallel else ""
        head, rule = text_then(self.marker, token)
        if not text:
            head, rule = f"WS? {either(self.marker, token)}", ""
        return f"%llguidance {{}}\nstart: {'TEXT | ' if text else ''}{head} {call} {more}\n{rule}{RULES}"

    def parse(self, calls: str) -> list[tuple[str, Any]]:
        blocks = re.findall(r"<tool_call>(.*?)</tool_call>", calls, re.S)
        if not blocks or re.sub(r"<tool_call>.*?</tool_call>", "", calls, flags=re.S).strip():
            raise ValueError("text outside <tool_call> blocks")
        return [read_call(json.loads(block), self.key) for block in blocks]


class Llama3(CallFormat):
    """Llama 3.1-3.3's JSON tools: the whole reply is ``{"name": ..., "parameters": {...}}`` (after
    ``<|python_tag|>`` or not; calls joined by ``;``), so a reply that begins with ``{`` is a call
    (as vLLM's llama3_json parser reads it)."""

    name, marker, key = "llama3_json", "<|python_tag|>", "parameters"

    def detects(self, template: str) -> bool:
        return self.marker in template or '"parameters": dictionary of argument name' in template

    def grammar(self, tools: dict[str, Function], parallel: bool, token: Token, text: bool = True) -> str:
        call = f"%json {json.dumps(self.call_schema(tools))}"
        more = f'(WS? ";" WS? {call})*' if parallel else ""
        plain = "PLAIN: /\\s*([^\\s{](.|\\n)*)?/\n"  # a reply that does not begin with {
        calls = f"WS? {either(self.marker, token)}? WS? {call} {more}"
        return f"%llguidance {{}}\nstart: {'PLAIN | ' if text else ''}{calls}\n{plain}{RULES}"

    def split(self, text: str) -> tuple[str, str | None]:
        start = text.lstrip()
        return ("", text) if start.startswith(("{", self.marker)) else (text, None)

    def parse(self, calls: str) -> list[tuple[str, Any]]:
        text, decoder, out = calls.strip().removeprefix(self.marker), json.JSONDecoder(), []
        at = 0
        while True:
            at = len(text) - len(text[at:].lstrip())
            value, at = decoder.raw_decode(text, at)
            out.append(read_call(value, self.key))
            rest = text[at:].lstrip()
            if not rest:
                return out
            if not rest.startswith(";"):
                raise ValueError("calls are joined by ;")
            at = len(text) - len(rest) + 1

    def held(self, text: str) -> int:
        start = text.lstrip()  # the reply's start may still be a call's "{" or the marker
        return len(text) if not start or self.marker.startswith(start) else 0


class Mistral(CallFormat):
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``: Mistral 7B v0.3, Nemo, Small 2409-
    2501 (not the newer ``[TOOL_CALLS]name[ARGS]{...}``, whose templates say ``[ARGS]``)."""

    name, marker = "mistral", "[TOOL_CALLS]"

    def detects(self, template: str) -> bool:
        return self.marker in template and "[ARGS]" not in template

    def grammar(self, tools: dict[str, Function], parallel: bool, token: Token, text: bool = True) -> str:
        schema = {"type": "array", "items": self.call_schema(tools), "minItems": 1,
                  **({} if parallel else {"maxItems": 1}), "x-guidance": WHITESPACE}  # fmt: skip
        head, rule = text_then(self.marker, token)
        if not text:
            head, rule = f"WS? {either(self.marker, token)}", ""
        return f"%llguidance {{}}\nstart: {'TEXT | ' if text else ''}{head} WS? %json {json.dumps(schema)}\n{rule}{RULES}"

    def parse(self, calls: str) -> list[tuple[str, Any]]:
        value = json.loads(calls.removeprefix(self.marker))
        if not isinstance(value, list) or not value:
            raise ValueError("the calls are a JSON list")
        return [read_call(one, self.key) for one in value]


FORMATS: dict[str, CallFormat] = {f.name: f for f in (Hermes(), Llama3(), Mistral())}


def token_of(tokenizer: Any) -> Token:
    """How a grammar names a marker's own token in ``tokenizer``'s vocabulary (``<[id]>``), where it
    has one (llguidance reads every added token as special: only ``<[id]>`` matches it)."""

    def token(text: str) -> str | None:
        i = tokenizer.backend.token_to_id(text)
        return None if i is None else f"<[{i}]>"

    return token


def detect(template: str | None) -> str | None:
    """The name of the call format a chat template teaches its model (None: none graft knows)."""
    return next((name for name, f in FORMATS.items() if template and f.detects(template)), None)


class Calling:
    """How this request's reply becomes tool calls: the constraint it is generated under, and the
    calls read back from its text. ``format``: the model's own format for calls, for "auto"."""

    def __init__(
        self, tools: list[Tool], choice: Any, parallel: bool | None, format: str | None = None
    ) -> None:
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
        # "auto" and "required" in the model's own format where graft knows it (its calls then are
        # what it was trained to write); a named function's reply is its arguments (streamed)
        known = choice in (None, "auto", "required") and format is not None
        self.format = FORMATS[format] if known else None
        self.free = choice in (None, "auto")  # text may come instead of calls, or before them

    @property
    def auto(self) -> bool:
        """The model decides between text and calls, in its own format."""
        return self.format is not None and self.free

    def options(self, token: Token) -> dict[str, Any]:
        """The GenerationConfig options that constrain the reply; ``token`` names a marker's token."""
        if self.format is not None:
            return {"grammar": self.format.grammar(self.tools, self.parallel, token, text=self.free)}
        return {"json_schema": self.schema()}

    def schema(self) -> dict[str, Any]:
        """The JSON schema a named or required reply is constrained to."""
        if self.named is not None:
            return self.tools[self.named].parameters
        return {
            "type": "array",
            "minItems": 1,
            **({} if self.parallel else {"maxItems": 1}),
            "items": {"anyOf": call_schemas(self.tools, "parameters")},
        }

    def reply(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """A reply that ended as its constraint allows: its content and its calls (None: a text only)."""
        if self.format is None:
            return None, self.calls(text)
        content, calls = self.format.split(text)
        if calls is None:
            return text, None
        try:
            found = self.format.parse(calls)
        except ValueError:  # (json's errors are ValueErrors) not calls after all: the text as it came
            return text, None
        if any(name not in self.tools for name, _ in found):
            return text, None
        return content.strip() or None, [call(n, json.dumps(a, ensure_ascii=False)) for n, a in found]

    def calls(self, text: str) -> list[dict[str, Any]]:
        """OpenAI's ``tool_calls`` from a named or required reply's text (complete: it ended as the
        schema allows)."""
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


def calling(
    tools: list[Tool] | None, choice: Any, parallel: bool | None, format: str | None = None
) -> Calling | None:
    """The request's tool calling (None: the reply is text), or a 422 for a choice graft cannot keep;
    ``format``: the model's own format for calls (needed by "auto", the default with tools)."""
    if choice is not None and not tools and choice != "none":
        raise HTTPError(422, "tool_choice: only with tools", "tool_choice")
    if not tools or choice == "none":
        return None
    if choice in (None, "auto") and format is None:
        raise HTTPError(
            422,
            'tool_choice: "auto" (the default with tools) needs the model\'s own format for calls, and '
            f"its chat template names none graft reads ({', '.join(FORMATS)}: graft serve --tool-format "
            'NAME says which); send "required" or {"type": "function", "function": {"name": ...}} '
            '(the reply is then constrained to the call), or "none"',
            "tool_choice",
        )
    return Calling(tools, choice, parallel, format)
