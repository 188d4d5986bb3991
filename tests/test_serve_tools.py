"""Tool calls with tool_choice "auto" (graft/serve/tools.py): the model answers in text or calls
tools in its family's own format, which graft knows from the chat template; once the model writes
the format's marker, a grammar holds it to calls of the given tools, so every call it starts
parses, names a tool and matches that tool's schema.

Each format reads its own calls; its grammar takes text, or calls of the tools only; and
``graft serve`` on a tiny random byte-level GPT-2, whose reply logit_bias steers to the marker,
answers with OpenAI's tool_calls (JSON and streamed) or with text.
"""

from __future__ import annotations

import json

import httpx
import pytest
from test_constrain import byte_gpt2
from test_serve import Server, sse

from graft.serve.tools import FORMATS, Function, detect, token_of
from graft.tokenizer import Tokenizer

llg = pytest.importorskip("llguidance")

EOS, CALL, END_CALL, TOOL_CALLS = 256, 257, 258, 259  # after the 256 bytes
SPACES = {
    "220": -100,
    "197": -100,
    "198": -100,
    "201": -100,
}  # " ", "\t", "\n", "\r": a random model's favourites
UNITS = ["celsius", "fahrenheit"]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": UNITS},
           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}  # fmt: skip
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
         "additionalProperties": False}  # fmt: skip
TOOLS = {"get_weather": Function(name="get_weather", parameters=WEATHER),
         "get_time": Function(name="get_time", parameters=CLOCK)}  # fmt: skip
REQUEST_TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": f.parameters}} for n, f in TOOLS.items()
]

# what each format's models write: text and no call, text then calls, calls alone
REPLIES = {
    "hermes": [
        ("It is sunny.", "It is sunny.", None),
        ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", '
         '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
         "Let me look.",
         [("get_weather", {"city": "Paris", "unit": "celsius", "days": 2}), ("get_time", {"zone": "CET"})]),
        ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>', None,
         [("get_time", {"zone": "UTC"})]),
    ],
    "llama3_json": [
        ("It is sunny.", "It is sunny.", None),
        ('{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_time", "parameters": {"zone": "CET"}}',
         None, [("get_time", {"zone": "UTC"}), ("get_time", {"zone": "CET"})]),
        ('  <|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}', None, [("get_time", {"zone": "UTC"})]),
    ],
    "mistral": [
        ("It is sunny.", "It is sunny.", None),
        ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", "arguments": '
         '{"city": "Oslo", "unit": "celsius", "days": 1}}]', None,
         [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo", "unit": "celsius", "days": 1})]),
        ('Sure.[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}]', "Sure.",
         [("get_time", {"zone": "UTC"})]),
    ],
}  # fmt: skip
# replies that are no format's calls: a call the grammar would not have let through, cut short, ...
NOT_CALLS = {
    "hermes": ['<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}', "<tool_call>not json</tool_call>",
               '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call> and more'],
    "llama3_json": ['{"name": "get_time"', '{"name": "get_time", "parameters": 3}', '{"name": "x", "parameters": {}} {'],
    "mistral": ['[TOOL_CALLS][{"name": "get_time"', "[TOOL_CALLS]{}", "[TOOL_CALLS][]"],
}  # fmt: skip

CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
# the heart of each family's template: where it tells the model its tools and how to call them
TEMPLATES = {
    "hermes": (  # Qwen 2.5's
        "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}{{- tool | tojson }}"
        "{%- endfor %}{{- '</tools>\\nFor each function call, return a json object within <tool_call></tool_call> "
        "XML tags' }}{%- endif %}"
    ),
    "llama3_json": (  # Llama 3.1's
        "{{- 'Given the following functions, please respond with a JSON for a function call with its proper "
        'arguments that best answers the given prompt.\\n\\nRespond in the format {\\"name\\": function name, '
        '\\"parameters\\": dictionary of argument name and its value}.\' }}'
        "{%- if builtin_tools is defined %}{{- '<|python_tag|>' }}{%- endif %}"
    ),
    "mistral": "{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]",
}
OTHER_TEMPLATES = [
    None,
    "",
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",  # SmolLM2's
    "[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS][TOOL_CALLS]{{ name }}[ARGS]{{ arguments }}",  # Magistral's
]


def byte_folder(folder, template: str):
    """A tiny random GPT-2 over bytes (token i is byte i) plus end-of-text, <tool_call> and
    </tool_call> (added, not special: Qwen's) and [TOOL_CALLS] and <|python_tag|> (special tokens),
    with ``template`` as its chat template."""
    backend = byte_gpt2(folder, vocab_size=261, n_positions=1024)
    backend.add_tokens(["<tool_call>", "</tool_call>"])
    backend.add_special_tokens(["[TOOL_CALLS]", "<|python_tag|>"])
    backend.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    return Tokenizer.from_folder(byte_folder(tmp_path_factory.mktemp("byte"), TEMPLATES["hermes"]))


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_reads_its_own_calls_and_leaves_text_as_text(name):
    form = FORMATS[name]
    for text, content, calls in REPLIES[name]:
        said, rest = form.split(text)
        assert (rest is None) == (calls is None), text
        if calls is not None:
            assert (said.strip() or None) == content and form.parse(rest) == calls
    for text in NOT_CALLS[name]:
        _, rest = form.split(text)
        with pytest.raises(ValueError):
            form.parse(rest)


def test_a_streamed_reply_holds_back_only_what_may_begin_a_marker():
    hermes, llama, mistral = FORMATS["hermes"], FORMATS["llama3_json"], FORMATS["mistral"]
    held = [hermes.held(t) for t in ("It is", "It is <", "It is <tool_c", "a <tool_call", "<b>")]
    assert held == [0, 1, 7, 10, 0]
    assert [mistral.held(t) for t in ("It", "It [TOOL", "[x]")] == [0, 5, 0]
    # a Llama 3 reply is a call if it begins with one: held while it may still
    assert [llama.held(t) for t in ("", "  ", " <|py", "It {", "<b>")] == [0, 2, 5, 0, 0]


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_streamed_reply_sends_its_text_before_the_calls_and_nothing_of_them(name):
    """Each reply streamed a character at a time: what went out as content while it came, then
    (once it ended) the rest if it held no calls."""
    form = FORMATS[name]
    for text, content, calls in REPLIES[name]:
        sent, out, began = 0, "", False
        for end in range(1, len(text) + 1):
            if not began:
                sure, began = form.sure(text[:end])
                out, sent = out + text[sent : max(sent, sure)], max(sent, sure)
        if calls is None:
            out += text[sent:]  # the end, held back while it might have begun a marker
            assert out == text
        else:
            assert out.strip() == (content or "")


def test_a_chat_template_names_its_models_format_for_calls():
    assert {name: detect(template) for name, template in TEMPLATES.items()} == {
        name: name for name in TEMPLATES
    }
    assert [detect(t) for t in OTHER_TEMPLATES] == [None] * len(OTHER_TEMPLATES)


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_grammar_takes_text_or_calls_of_the_tools_and_then_only_the_end(name, byte_tokenizer):
    from graft.generation import GenerationConfig
    from graft.generation.constrain import Constraint, Vocabulary

    vocabulary = Vocabulary(byte_tokenizer, 261, [EOS])
    form = FORMATS[name]

    def constraint(text: str, parallel: bool = True):
        """graft's constraint after ``text``'s tokens (None: it did not take them all)."""
        grammar = form.grammar(TOOLS, parallel, token_of(byte_tokenizer))
        rule = Constraint(vocabulary, GenerationConfig(grammar=grammar), 1)
        for token in byte_tokenizer.backend.encode(text, add_special_tokens=False).ids:
            if not rule.allowed()[0, token]:
                return None
            rule.advance([token], [0])
        return rule

    for text, _, calls in REPLIES[name]:
        rule = constraint(text)
        assert rule is not None and rule.matchers[0].is_accepting(), text
        if calls is not None:  # after a whole call: the end, or (Hermes, Llama) another call
            allowed = rule.allowed()[0]
            assert allowed[EOS] and allowed.sum() < 20
        if calls is not None and len(calls) > 1:
            assert constraint(text, parallel=False) is None  # one call at most
    for text, content, calls in REPLIES[name]:  # "required": calls alone
        grammar = form.grammar(TOOLS, True, token_of(byte_tokenizer), text=False)
        rule = Constraint(vocabulary, GenerationConfig(grammar=grammar), 1)
        took = all(rule.allowed()[0, t] and rule.advance([t], [0]) is None for t in byte_tokenizer.backend.encode(text, add_special_tokens=False).ids)  # fmt: skip
        assert took == (calls is not None and content is None), text  # (no text before them)
    key = form.key
    for call in (  # a call of no tool, arguments outside the schema, the wrong key
        {"name": "get_date", key: {"zone": "UTC"}},
        {"name": "get_time", key: {"zone": "PST"}},
        {"name": "get_weather", key: {"city": "Paris", "unit": "celsius", "days": 9}},
        {"name": "get_time", "args": {"zone": "UTC"}},
    ):
        text = {"hermes": f"<tool_call>{json.dumps(call)}</tool_call>", "llama3_json": json.dumps(call),
                "mistral": f"[TOOL_CALLS][{json.dumps(call)}]"}[name]  # fmt: skip
        assert constraint(text) is None, text


def ask_body(**extra) -> dict:
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 300,
            "temperature": 0, "tools": REQUEST_TOOLS}  # fmt: skip
    return body | extra


def ask(server, **extra) -> httpx.Response:
    return server.client.post("/v1/chat/completions", json=ask_body(**extra))


def assert_call_of_the_tools(call: dict) -> None:
    name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    if name == "get_weather":
        assert set(arguments) == {"city", "unit", "days"} and arguments["unit"] in UNITS
        assert 1 <= arguments["days"] <= 7 and len(arguments["city"]) <= 12
    else:
        assert name == "get_time" and arguments["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("name", ["hermes", "mistral"])
def test_graft_serve_answers_auto_with_the_models_calls_or_its_text(name, tmp_path):
    """A Qwen-like template (<tool_call>: an added token) and a Mistral-like one given with
    --chat-template ([TOOL_CALLS]: a special token, kept in the reply's text); the random model's
    reply is steered by logit_bias to the marker (a call) or away from it (text)."""
    folder = byte_folder(tmp_path / "model", TEMPLATES["hermes"] + CHAT)
    args = []
    if name == "mistral":
        (tmp_path / "mistral.jinja").write_text(TEMPLATES["mistral"] + CHAT, encoding="utf-8")
        args = ["--chat-template", str(tmp_path / "mistral.jinja")]
    marker = {"hermes": CALL, "mistral": TOOL_CALLS}[name]
    server = Server(folder, *args, log=tmp_path / "serve.log")
    try:
        assert server.client.get("/info").json()["tool_format"] == name
        steer = {str(marker): 100} | SPACES  # to the marker, then no whitespace between JSON's tokens
        got = ask(server, logit_bias=steer, parallel_tool_calls=False).json()["choices"][0]
        assert got["finish_reason"] == "tool_calls", got
        assert got["message"]["content"] is None
        (call,) = got["message"]["tool_calls"]
        assert_call_of_the_tools(call)

        body = {"logit_bias": steer, "parallel_tool_calls": False, "stream": True}
        with server.client.stream("POST", "/v1/chat/completions", json=ask_body() | body) as r:
            chunks = [c["choices"][0] for c in sse(r)]
        assert chunks[0]["delta"]["role"] == "assistant" and chunks[-1]["finish_reason"] == "tool_calls"
        assert not any(c["delta"].get("content") for c in chunks)  # the marker and the call are no content
        (streamed,) = [c["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["delta"]]
        assert streamed[0]["index"] == 0 and streamed[0]["function"] == call["function"]  # greedy: the same

        # "required": the grammar writes the marker (no steering to it), then a call
        required = ask(server, tool_choice="required", logit_bias=SPACES, parallel_tool_calls=False).json()
        assert required["choices"][0]["finish_reason"] == "tool_calls", required
        (forced,) = required["choices"][0]["message"]["tool_calls"]
        assert_call_of_the_tools(forced)

        text = ask(server, logit_bias={str(marker): -100}, max_tokens=20).json()["choices"][0]
        assert text["finish_reason"] in ("stop", "length") and "tool_calls" not in text["message"]
        with server.client.stream("POST", "/v1/chat/completions",
                                  json=ask_body(max_tokens=20) | {"logit_bias": {str(marker): -100}, "stream": True}) as r:  # fmt: skip
            chunks = [c["choices"][0] for c in sse(r)]
        assert "".join(c["delta"].get("content") or "" for c in chunks) == text["message"]["content"]

        none = ask(server, tool_choice="none", logit_bias={str(marker): 100}, max_tokens=5).json()
        assert none["choices"][0]["message"].get("tool_calls") is None  # no grammar: the marker is text
    finally:
        server.close()


def test_serve_refuses_a_tool_format_or_chat_template_it_cannot_use(cli, tmp_path):
    folder = byte_folder(tmp_path / "model", CHAT)
    line = cli("serve", folder, "--tool-format", "hermez").error_line()
    assert (
        line == "error: --tool-format hermez: not one of hermes, llama3_json, mistral; did you mean 'hermes'?"
    )
    missing = tmp_path / "none.jinja"
    assert (
        cli("serve", folder, "--chat-template", missing)
        .error_line()
        .startswith(f"error: --chat-template {missing}: ")
    )
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n", encoding="utf-8")
    assert (
        cli("serve", folder, "--chat-template", broken)
        .error_line()
        .startswith(f"error: --chat-template {broken}: line 2: ")
    )
