"""OpenAI's completions and chat completions over continuous batching (graft/serve/continuous.py):
the request bodies, each request's generation settings, several prompts and choices, log-
probabilities, and the answer as JSON or server-sent events. ``register`` adds the endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import Field

from graft.serve.continuous import Scored, Sequence, first_stop, held_back
from graft.serve.http import Body, HTTPError, check_token_ids, error_body, too_long
from graft.serve.model import Served
from graft.serve.tools import (
    Call,
    Calling,
    Tool,
    ToolChoice,
    call_for_template,
    calling,
    for_template,
    token_of,
)


class StreamOptions(Body):
    include_usage: bool = False


class JsonSchema(Body):
    name: str | None = Field(None, description="The schema's name (OpenAI's; not used).")
    description: str | None = None
    schema_: dict[str, Any] = Field(
        default_factory=dict,
        alias="schema",
        description="The JSON schema the reply must match ({}: any JSON).",
    )
    strict: bool | None = Field(None, description="Accepted: the reply always matches the schema.")


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="json_object: the reply is a JSON object; json_schema: it matches json_schema.schema."
    )
    json_schema: JsonSchema | None = None


class Sampling(Body):
    model: str | None = None
    user: str | None = Field(None, description="OpenAI's end-user id: accepted, not used.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="Token id -> a bias added to its logit before sampling."
    )
    seed: int | None = Field(None, description="With n > 1, choice j samples with seed + j.")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="Choices per prompt.")
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = Field(
        None, description="vLLM's: a JSON schema the reply matches."
    )
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression the reply matches.")
    guided_choice: list[str] | None = Field(
        None, min_length=1, description="vLLM's: the reply is one of these."
    )
    guided_grammar: str | None = Field(None, description="A Lark grammar the reply matches (llguidance's).")
    truncate: bool = Field(
        False, description="Keep the prompt's last tokens when it does not fit the window."
    )


class CompletionRequest(Sampling):
    max_tokens: int | None = Field(
        None, ge=0, description="0, with echo and logprobs: score the prompt only."
    )
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, token ids, or a list of either: one choice each."
    )
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Each token's log-probability and the n likeliest tokens at its place."
    )
    echo: bool = Field(
        False, description="Repeat the prompt before the completion (scored too, with logprobs)."
    )


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(
        None, description="A text, or OpenAI's list of text parts (joined); none for an assistant's calls."
    )
    name: str | None = Field(None, description="The speaker's name, passed to the chat template.")
    tool_calls: list[Call] | None = Field(None, description="An assistant's tool calls.")
    tool_call_id: str | None = Field(None, description="A tool message: the call it answers.")

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template reads it: its role, its text (and name, calls, call id,
        when given)."""
        content = self.content
        # (an assistant's calls without content: "", which every template can read)
        text = (
            ""
            if content is None
            else content
            if isinstance(content, str)
            else "".join(p.text for p in content)
        )
        out: dict[str, Any] = {"role": self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [call_for_template(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Each generated token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="The n likeliest tokens at each place.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call (graft/serve/tools.py).")
    tool_choice: ToolChoice | None = Field(
        None,
        description='"auto" (the default with tools: text or calls, in the model\'s own format), '
        '"required" or a named function (the reply constrained to the call), or "none".',
    )
    parallel_tool_calls: bool | None = Field(None, description="False: at most one call.")


def register(app: FastAPI, state: Any, generated: Callable[..., Any]) -> None:
    """Add POST /v1/completions and /v1/chat/completions to ``app``; ``state`` is the app's
    graft.serve.app.State (its model, its engine, its admission count); ``generated`` runs a
    seq2seq model's prompts on its queue (graft.serve.app)."""

    def served() -> Served:
        return state.model()

    def generation(body: Sampling, max_tokens: int | None) -> Any:
        from graft.generation import GenerationConfig

        s = served()
        config = GenerationConfig.for_model(s.model, s.generation_defaults)
        if config.eos_token_id is None and s.tokenizer.eos_token_id is not None:
            config = config.replace(eos_token_id=s.tokenizer.eos_token_id)
        return config.replace(**sampling(body, max_tokens))

    def sampling(body: Sampling, max_tokens: int | None) -> dict[str, Any]:
        """The GenerationConfig options a request's fields set."""
        s = served()
        changes: dict[str, Any] = {"max_new_tokens": max_tokens or 16}
        if body.temperature is not None:  # 0 = greedy
            changes["do_sample"] = body.temperature > 0
            if body.temperature > 0:
                changes["temperature"] = body.temperature
        elif any(v is not None for v in (body.top_k, body.top_p, body.min_p)):
            changes["do_sample"] = True
        for name in (
            "top_k",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
            "seed",
        ):
            if getattr(body, name) is not None:
                changes[name] = getattr(body, name)
        if body.logit_bias:
            vocab = s.config.vocab_size
            ids = {key: int(key) if key.strip().isdigit() else -1 for key in body.logit_bias}
            bad = next((key for key, i in ids.items() if not 0 <= i < vocab), None)
            if bad is not None:
                raise HTTPError(422, f"logit_bias: {bad!r} is not a token id (0..{vocab - 1})", "logit_bias")
            changes["logit_bias"] = {ids[key]: value for key, value in body.logit_bias.items()}
        if body.stop:
            changes["stop_strings"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        return changes

    def constrained(body: Sampling) -> tuple[str, dict[str, Any]] | None:
        """The request field that constrains the reply, and the GenerationConfig options it sets."""
        given = []
        form = body.response_format
        if form is not None and form.type == "json_object":
            given.append(("response_format", {"json_schema": {"type": "object"}}))
        elif form is not None and form.type == "json_schema":
            if form.json_schema is None:
                raise HTTPError(422, "response_format: type json_schema needs json_schema", "response_format")
            given.append(("response_format.json_schema.schema", {"json_schema": form.json_schema.schema_}))
        if body.guided_json is not None:
            schema = body.guided_json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise HTTPError(422, f"guided_json: not JSON ({e})", "guided_json") from None
            given.append(("guided_json", {"json_schema": schema}))
        if body.guided_regex is not None:
            given.append(("guided_regex", {"regex": body.guided_regex}))
        if body.guided_choice is not None:  # a Lark grammar of the choices, each a JSON-escaped literal
            grammar = "start: " + " | ".join(json.dumps(choice) for choice in body.guided_choice)
            given.append(("guided_choice", {"grammar": grammar}))
        if body.guided_grammar is not None:
            given.append(("guided_grammar", {"grammar": body.guided_grammar}))
        if len(given) > 1:
            names = " and ".join(name.split(".")[0] for name, _ in given)
            raise HTTPError(422, f"{names}: give one constraint on the reply", given[1][0])
        return given[0] if given else None

    def constraints(field: str | None, configs: list[Any]) -> list[Any]:
        """Each sequence's constraint (None where the reply is free); a grammar that does not
        compile is a 422 naming ``field``, the request's. Runs in a thread: the vocabulary takes
        0.3 s to build once, a large schema up to a second to compile."""
        from graft.errors import GraftError
        from graft.generation.constrain import Constraint, Vocabulary

        if not configs or not configs[0].constrained:
            return [None] * len(configs)
        s = served()
        try:
            vocabulary = Vocabulary.of(s.tokenizer, s.config.vocab_size, configs[0].eos_ids)
            return [Constraint(vocabulary, config, 1) for config in configs]
        except GraftError as e:
            reason = re.sub(r"^generation: ((json_schema|regex|grammar): )?", "", str(e))
            raise HTTPError(422, f"{field}: {reason}", field) from None

    def fit(prompt: list[int], config: Any, truncate: bool) -> tuple[list[int], Any]:
        """The prompt and max_new_tokens within the window: 413, or the prompt's last tokens."""
        window = served().max_length
        if len(prompt) >= window:
            if not truncate:
                raise too_long(
                    "the prompt",
                    len(prompt),
                    window,
                    "prompt",
                    "keep its last tokens",
                    "the model's context holds",
                )
            prompt = prompt[-max(1, window - config.max_new_tokens) :]
        return prompt, config.replace(max_new_tokens=min(config.max_new_tokens, window - len(prompt)))

    def start(
        prompts: list[tuple[list[int], Any]],
        logprobs: int | None,
        echo: bool,
        generate: bool = True,
        constraints: list[Any] | None = None,
        special: bool = False,
    ) -> tuple[asyncio.Queue, list[Sequence]]:
        """One sequence per (prompt, generation config), submitted to the engine; their events arrive
        as (index, event). ``echo`` with ``logprobs``: the prompt's tokens are scored too;
        ``constraints``: each sequence's (graft.generation.constrain), or None; ``special``: the
        texts keep special tokens."""
        s = served()
        if state.engine is None:
            raise HTTPError(400, f"{s.name} is a {s.task} model: it does not generate text")
        for i, (prompt, _) in enumerate(prompts):
            if not prompt:
                raise HTTPError(
                    422, "the prompt is empty" if len(prompts) == 1 else f"prompt[{i}] is empty", "prompt"
                )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emitter(index: int) -> Callable[[tuple], None]:
            def emit(event: tuple) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: the server is stopping
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))

            return emit

        state.admit(len(prompts))
        seqs = [
            Sequence(
                prompt,
                config,
                s.tokenizer,
                emitter(i),
                logprobs=logprobs,
                echo=echo and logprobs is not None,
                generate=generate,
                constraint=constraints[i] if constraints else None,
                special=special,
            )
            for i, (prompt, config) in enumerate(prompts)
        ]
        for seq in seqs:
            state.engine.submit(seq)
        return events, seqs

    async def pieces(events: asyncio.Queue, seqs: list[Sequence]) -> AsyncIterator[tuple[int, tuple]]:
        """The sequences' (index, event) until each is done; a client gone cancels them (their rows
        leave at the next step). The request counts as in flight until its last byte is sent."""
        try:
            running = len(seqs)
            while running:
                index, event = await events.get()
                yield index, event
                if event[0] in ("done", "error"):
                    running -= 1
                else:
                    await asyncio.sleep(0)  # a fast stream must not keep the loop from other requests
        finally:
            for seq in seqs:
                seq.cancelled = True
            state.release(len(seqs))

    def usage(done: list[tuple]) -> dict[str, int]:
        """Token counts of the sequences' ("done", reason, prompt_tokens, completion_tokens) events."""
        prompt_tokens, completion_tokens = sum(e[2] for e in done), sum(e[3] for e in done)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def token_text(token: int) -> str:
        return served().tokenizer.decode([token], skip_special_tokens=False)

    def completion_logprobs(entries: list[Scored], offset: int) -> dict[str, Any]:
        """OpenAI's (legacy) completions logprobs of ``entries``, their text offsets from ``offset``."""
        tokens = [token_text(token) for token, _, _ in entries]
        return {
            "tokens": tokens,
            "token_logprobs": [logprob for _, logprob, _ in entries],
            "top_logprobs": [
                None if logprob is None else {token_text(t): v for t, v in top} for _, logprob, top in entries
            ],
            "text_offset": list(itertools.accumulate((len(t) for t in tokens), initial=offset))[:-1],
        }

    def chat_logprobs(entries: list[Scored]) -> dict[str, Any]:
        """OpenAI's chat logprobs of ``entries``: each token's text, log-probability and UTF-8 bytes."""

        def one(token: int, logprob: float | None) -> dict[str, Any]:
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

        return {
            "content": [one(t, lp) | {"top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in entries]
        }

    async def respond(
        body: Sampling,
        prompts: list[list[int]],
        max_tokens: int | None,
        chat: bool,
        logprobs: int | None = None,
        echo: list[str] | None = None,
        tools: Calling | None = None,
    ) -> Any:
        """The answer to a completion (one choice per prompt) or a chat: JSON, or server-sent events.
        ``logprobs``: how many likeliest tokens to list beside each token's log-probability (None:
        no log-probabilities); ``echo``: the prompts' texts, to repeat before each completion (with
        ``logprobs``, the prompt's tokens are scored too); ``tools``: a chat's reply is tool calls."""
        config = generation(body, max_tokens or None)  # (0: the prompt only scored)
        rule = constrained(body)  # the field that constrains the reply, and the options it sets
        field = None
        if rule is not None:
            field, options = rule
            config = config.replace(**options)
        if tools is not None:
            if field is not None:
                raise HTTPError(422, f"{field}: with tool_choice the reply is the call; drop one", field)
            config, field = config.replace(**tools.options(token_of(served().tokenizer))), "tools"
        fitted = [fit(prompt, config, body.truncate) for prompt in prompts]
        # n choices per prompt (choice i * n + j); with a seed, choice j samples with seed + j
        fitted = [
            (p, c.replace(seed=c.seed + j) if j and c.seed is not None else c)
            for p, c in fitted
            for j in range(body.n)
        ]
        echo = [text for text in echo for _ in range(body.n)] if echo is not None else None
        rules = await asyncio.to_thread(constraints, field, [c for _, c in fitted])
        special = tools is not None and tools.format is not None  # its markers may be special tokens
        events, seqs = start(fitted, logprobs, echo is not None, max_tokens != 0, rules, special)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created, name = int(time.time()), served().name
        kind = "chat.completion" if chat else "text_completion"
        texts: list[list[str]] = [[] for _ in seqs]  # each choice's text so far (answered whole)
        pending: list[list[Scored]] = [[] for _ in seqs]  # each choice's scored tokens not yet sent
        offsets = [0] * len(seqs)  # the text offset of each choice's next token

        def take_logprobs(index: int) -> dict[str, Any] | None:
            """The log-probabilities gathered for choice ``index`` since the last ones sent."""
            if logprobs is None:
                return None
            entries, pending[index] = pending[index], []
            if chat:
                return chat_logprobs(entries)
            out = completion_logprobs(entries, offsets[index])
            if entries:
                offsets[index] = out["text_offset"][-1] + len(out["tokens"][-1])
            return out

        def choice(index: int, text: str | None, reason: str | None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {
                    "index": index,
                    "text": text or "",
                    "logprobs": take_logprobs(index),
                    "finish_reason": reason,
                }
            delta = {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            return {"index": index, "delta": delta, "logprobs": take_logprobs(index), "finish_reason": reason}

        if not body.stream:
            done: list[tuple] = [()] * len(seqs)
            async for index, event in pieces(events, seqs):
                if event[0] == "error":
                    raise HTTPError(500, event[1])
                if event[0] == "logprobs":
                    pending[index].extend(event[1])
                elif event[0] == "text":
                    texts[index].append(event[1])
                else:
                    done[index] = event
            choices = []
            for index, event in enumerate(done):
                text = (echo[index] if echo is not None else "") + "".join(texts[index])
                content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
                reason = event[1]
                if tools is not None and (reason == "stop" or tools.named is not None):
                    # the calls (a named function's arguments as far as they came, at "length"); with
                    # "auto", text and no calls, or the text before them and the calls
                    said, calls = tools.reply(text) if reason == "stop" else (None, tools.partial(text))
                    if calls is not None:
                        content = {"message": {"role": "assistant", "content": said, "tool_calls": calls}}
                        reason = "tool_calls" if reason == "stop" else reason
                choices.append(
                    {"index": index, **content, "logprobs": take_logprobs(index), "finish_reason": reason}
                )
            return {"id": ident, "object": kind, "created": created, "model": name, "choices": choices,
                    "usage": usage(done)}  # fmt: skip

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def sse(choices: list, **extra: Any) -> str:
            chunk = {"id": ident, "object": chunk_kind, "created": created, "model": name, "choices": choices}
            return f"data: {json.dumps({**chunk, **extra}, ensure_ascii=False)}\n\n"

        def tool_delta(index: int, calls: list[dict[str, Any]], reason: str | None = None) -> dict[str, Any]:
            """A chunk's choice that carries tool calls (each with its index among the choice's calls)."""
            calls = [{"index": i, **c} for i, c in enumerate(calls)]
            return {"index": index, "delta": {"tool_calls": calls}, "logprobs": take_logprobs(index),
                    "finish_reason": reason}  # fmt: skip

        sent = [0] * len(seqs)  # with tools: how much of each choice's text went out as content
        calling = [False] * len(seqs)  # with "auto": the choice's calls have begun (held to the end)

        def new_content(index: int) -> str:
            """With "auto": the choice's new text that is surely content (not a marker's beginning)."""
            text = "".join(texts[index])
            end, calling[index] = tools.format.sure(text)
            new, sent[index] = text[sent[index] : end], max(sent[index], end)
            return new

        async def stream() -> AsyncIterator[str]:
            if chat:
                for index in range(len(seqs)):
                    yield sse([choice(index, "", None, first=True)])
                    if tools is not None and tools.named is not None:  # the call, its arguments to come
                        yield sse([tool_delta(index, tools.partial(""))])
            if echo is not None and logprobs is None:  # (with logprobs, once the prompt is scored)
                for index, text in enumerate(echo):
                    yield sse([choice(index, text, None)])
            done: list[tuple] = []
            async for index, event in pieces(events, seqs):
                if event[0] == "logprobs":
                    pending[index].extend(event[1])
                    if echo is not None and event[1][0][1] is None:  # the prompt, scored: echoed first
                        yield sse([choice(index, echo[index], None)])
                elif event[0] == "text" and tools is not None:
                    texts[index].append(event[1])
                    if tools.named is not None:  # the arguments as they come
                        yield sse([tool_delta(index, [{"function": {"arguments": event[1]}}])])
                    elif tools.auto and not calling[index] and (said := new_content(index)):
                        yield sse([choice(index, said, None)])  # text before any call, as it comes
                elif event[0] == "text":
                    yield sse([choice(index, event[1], None)])
                elif event[0] == "error":
                    yield f"data: {json.dumps(error_body(event[1], 500))}\n\n"
                else:
                    done.append(event)
                    reason = event[1]
                    if tools is not None and tools.named is None:  # the calls, once they are complete
                        text = "".join(texts[index])
                        calls = tools.reply(text)[1] if reason == "stop" else None
                        if calls is not None:
                            yield sse([tool_delta(index, calls)])
                            reason = "tool_calls"
                        elif len(text) > sent[index]:  # no calls after all: the text not yet sent
                            yield sse([choice(index, text[sent[index] :], None)])
                    elif tools is not None and reason == "stop":  # a named function's call
                        reason = "tool_calls"
                    yield sse([choice(index, None, reason)])
            if include_usage and done:
                yield sse([], usage=usage(done))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def seq2seq_completions(body: CompletionRequest, prompts: list[Any]) -> Any:
        """/v1/completions on an encoder-decoder (T5, BART): each prompt is the encoder's input and
        its completion the decoder's text, generated in batches by the queue (``stream: true``:
        the text as its tokens come, ``seq2seq_stream``). n, logprobs, echo, logit_bias and
        constraints are a causal LM's: a 422 naming the field."""
        rule = constrained(body)  # (the field that constrains the reply)
        for name, given in (("n", body.n != 1), ("logprobs", body.logprobs is not None), ("echo", body.echo),
                            ("logit_bias", bool(body.logit_bias)), (rule and rule[0].split(".")[0], rule)):  # fmt: skip
            if given:
                raise HTTPError(422, f"{name}: for a causal LM; {served().name} is a seq2seq model", name)
        if any(isinstance(p, str) for p in prompts) and not all(isinstance(p, str) for p in prompts):
            raise HTTPError(422, "prompt: texts or token id lists, not both", "prompt")
        changes = sampling(body, body.max_tokens)
        stops = changes.pop("stop_strings", [])
        answer = {"id": "cmpl-" + uuid.uuid4().hex, "object": "text_completion", "created": int(time.time()),
                  "model": served().name}  # fmt: skip
        if body.stream:
            return await seq2seq_stream(body, prompts, changes, stops, answer)
        rows, lengths = await generated(prompts, body.truncate, "prompt", changes)
        choices = [seq2seq_choice(index, new, ended, stops) for index, (new, ended) in enumerate(rows)]
        return {**answer, "choices": choices, "usage": seq2seq_usage(rows, lengths)}

    def seq2seq_choice(index: int, new: list[int], ended: bool, stops: list[str]) -> dict[str, Any]:
        """A completion's choice: the text of its ``new`` tokens, ending before the first stop string."""
        text, reason = served().tokenizer.decode(new, skip_special_tokens=True), "stop" if ended else "length"
        cut = first_stop(text, stops)
        if cut is not None:  # the text ends before the stop string (as OpenAI's servers do)
            text, reason = text[:cut], "stop"
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def seq2seq_usage(rows: list[tuple[list[int], bool]], lengths: list[int]) -> dict[str, int]:
        new_tokens = sum(len(new) for new, _ in rows)
        return {"prompt_tokens": sum(lengths), "completion_tokens": new_tokens,
                "total_tokens": sum(lengths) + new_tokens}  # fmt: skip

    async def seq2seq_stream(
        body: CompletionRequest, prompts: list[Any], changes: dict[str, Any], stops: list[str], answer: dict
    ) -> StreamingResponse:
        """Server-sent events of each prompt's text as the batch decodes it (each new token's text,
        held back while it could begin a stop string or ends in an incomplete character), and each
        choice's end (finish_reason) as it comes: at its end-of-text or stop string, else (its
        length) once the batch is done. A request refused before its first token (413, 429) is
        answered as such, not as a stream; a client that leaves stops its rows (the batch stops
        once no row is read)."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[tuple[int, int, bool]] = asyncio.Queue()  # (choice, its next token, it ends it)
        reader = {"open": True}

        def sink_of(index: int) -> Callable[[int, bool], bool]:
            def sink(token: int, ends: bool) -> bool:  # on the queue's thread
                if reader["open"]:
                    try:
                        loop.call_soon_threadsafe(tokens.put_nowait, (index, token, ends))
                    except RuntimeError:  # the loop is closed: the server is stopping
                        reader["open"] = False
                return reader["open"]

            return sink

        sinks = [sink_of(i) for i in range(len(prompts))]
        task = asyncio.ensure_future(generated(prompts, body.truncate, "prompt", changes, sinks))
        getter = asyncio.ensure_future(tokens.get())
        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception() is not None:  # refused, or failed, before any token
            getter.cancel()
            raise task.exception()
        decode = served().tokenizer.decode
        new: list[list[int]] = [[] for _ in prompts]
        shown, ended = [""] * len(prompts), [False] * len(prompts)

        def chunk(index: int, text: str, reason: str | None = None) -> str:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            return f"data: {json.dumps({**answer, 'choices': [choice]}, ensure_ascii=False)}\n\n"

        def rest(index: int, text: str) -> Iterator[str]:
            """The part of choice ``index``'s ``text`` not sent yet (a chunk, if any)."""
            if len(text) > len(shown[index]) and text.startswith(shown[index]):
                yield chunk(index, text[len(shown[index]) :])
                shown[index] = text

        def advance(index: int, token: int, ends: bool) -> Iterator[str]:
            """The chunks ``token`` makes for choice ``index``: its text as far as it may go out, and
            its end when it ends the choice (end-of-text, or a stop string)."""
            if ended[index]:
                return
            if not ends:
                new[index].append(token)
            text = decode(new[index], skip_special_tokens=True)
            cut = first_stop(text, stops)
            if ends or cut is not None:  # the choice ends (before the stop string: as OpenAI's servers do)
                ended[index] = True
                yield from rest(index, text[:cut])
                yield chunk(index, "", "stop")
            elif not text.endswith("\ufffd"):  # an incomplete character waits for its next bytes
                yield from rest(index, text[: len(text) - held_back(text, stops)])

        async def events() -> AsyncIterator[str]:
            nonlocal getter
            try:
                while True:
                    if getter.done():
                        for piece in advance(*getter.result()):
                            yield piece
                        getter = asyncio.ensure_future(tokens.get())
                    elif task.done():  # every token came before the batch's end: all are queued
                        getter.cancel()
                        while not tokens.empty():
                            for piece in advance(*tokens.get_nowait()):
                                yield piece
                        break
                    else:
                        await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
                if task.exception() is not None:
                    yield f"data: {json.dumps(error_body(str(task.exception()), 500))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                rows, lengths = task.result()
                for index, (ids, stopped) in enumerate(rows):  # the choices still open: their rest and end
                    if not ended[index]:
                        final = seq2seq_choice(index, ids, stopped, stops)
                        for piece in rest(index, final["text"]):
                            yield piece
                        yield chunk(index, "", final["finish_reason"])
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield f"data: {json.dumps({**answer, 'choices': [], 'usage': seq2seq_usage(rows, lengths)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # (the client gone: its rows stop at the next step)
                reader["open"] = False
                getter.cancel()
                task.cancel()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/v1/completions", tags=["OpenAI"])
    async def completions(body: CompletionRequest) -> Any:
        """OpenAI's text completions, one choice per prompt (a text or token ids); ``stream: true``
        sends server-sent events ending with [DONE]; ``logprobs`` and ``echo`` score the tokens. A
        seq2seq model (T5, BART) completes each prompt with its decoder's text."""
        s = served()
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # one prompt: a text or a list of token ids
        if not prompt:
            raise HTTPError(422, "prompt: at least one prompt", "prompt")
        vocab = s.config.vocab_size
        if s.seq2seq:
            for i, one in enumerate(prompt):
                if not isinstance(one, str):
                    check_token_ids(one, vocab, "prompt" if len(prompt) == 1 else f"prompt[{i}]", "prompt")
            return await seq2seq_completions(body, prompt)
        ids = []
        for i, one in enumerate(prompt):
            if isinstance(one, str):
                ids.append(
                    list(
                        s.tokenizer.encode(
                            one, truncation=False, padding=False, return_tensors=None
                        ).input_ids[0]
                    )
                )
                continue
            check_token_ids(one, vocab, "prompt" if len(prompt) == 1 else f"prompt[{i}]", "prompt")
            ids.append(list(one))
        if body.max_tokens == 0 and not (body.echo and body.logprobs is not None):
            raise HTTPError(
                422,
                "max_tokens: 0 generates nothing; with echo and logprobs it scores the prompt",
                "max_tokens",
            )
        if body.echo and body.truncate:
            raise HTTPError(422, "echo: a prompt that is cut cannot be echoed; send truncate: false", "echo")
        echo = None
        if body.echo:
            echo = [
                one if isinstance(one, str) else s.tokenizer.decode(one, skip_special_tokens=False)
                for one in prompt
            ]
        return await respond(body, ids, body.max_tokens, chat=False, logprobs=body.logprobs, echo=echo)

    @app.post("/v1/chat/completions", tags=["OpenAI"])
    async def chat_completions(body: ChatRequest) -> Any:
        """OpenAI's chat completions, through the checkpoint's chat template."""
        s = served()
        if s.seq2seq:
            raise HTTPError(
                400, f"{s.name} is a seq2seq model: send its input to /v1/completions or /predict"
            )
        if not s.generates:  # before the template: an encoder's tokenizer has none either
            raise HTTPError(400, f"{s.name} is a {s.task} model: it does not generate text")
        if not getattr(s.tokenizer, "chat_template", None):
            raise HTTPError(400, f"{s.name}: the tokenizer has no chat template; use /v1/completions")
        if body.top_logprobs is not None and not body.logprobs:
            raise HTTPError(422, "top_logprobs: only with logprobs: true", "top_logprobs")
        for i, m in enumerate(body.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise HTTPError(
                    422,
                    f"messages[{i}].content: only an assistant's calls come without it",
                    f"messages[{i}].content",
                )
        tools = calling(body.tools, body.tool_choice, body.parallel_tool_calls, state.call_format())
        messages = [m.for_template() for m in body.messages]
        variables = {"tools": for_template(body.tools)} if body.tools else {}
        ids = s.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, **variables
        )
        top = (body.top_logprobs or 0) if body.logprobs else None
        return await respond(
            body,
            [list(ids)],
            body.max_completion_tokens or body.max_tokens,
            chat=True,
            logprobs=top,
            tools=tools,
        )
