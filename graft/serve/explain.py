"""POST /explain: token attributions for the text a user typed, the numbers of ``graft explain``.

    curl -s localhost:8000/explain -d '{"text": "A fine film.", "method": "ig"}'

The answer is graft explain's explanation.json (task, target, position, score, tokens, special,
methods) for one method, plus ``caption``: what was explained, as the terminal view says it. The
work runs on the encoder queue's thread, one explanation at a time, so it never races a batched
forward; the playground at / colours the tokens with it.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import Field

from graft.errors import GraftError
from graft.serve.http import Body, HTTPError
from graft.serve.model import Served

TASKS = ("classification", "token-classification", "question-answering")  # served by the encoder queue


class ExplainRequest(Body):
    text: str = Field(description="The text to explain (for QA: the question).")
    context: str | None = Field(None, description="Question answering: the passage.")
    method: Literal["grad-x-input", "ig", "occlusion", "attention", "rollout"] = "grad-x-input"
    target: str | None = Field(None, description="Label, tag or start|end (default: the prediction).")
    position: int | None = Field(None, ge=0, description="Token classification: the token explained.")
    steps: int = Field(50, ge=2, le=1000, description="Integrated gradients: quadrature points.")


def explainable(served: Served) -> bool:
    """Whether /explain serves this model (the playground shows its Explain button then)."""
    return not served.exported and served.task in TASKS


def explain_items(
    served: Served, items: list[dict[str, Any]], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """One explanation per item ({text, context, target, position}), with ``options``' method and steps."""
    from graft.interpret import attribute, subject
    from graft.interpret.render import explanation, target_line

    out = []
    for item in items:
        s = subject(served.model, served.tokenizer, **item)
        expl = explanation(s, [attribute(s, options["method"], options["steps"])])
        out.append({**expl, "caption": target_line(expl)})
    return out


def register(app: FastAPI, state: Any) -> None:
    """Add POST /explain to ``app``; ``state`` is the app's graft.serve.app.State (its model and queue)."""

    @app.post("/explain", tags=["graft"])
    async def explain(body: ExplainRequest) -> dict[str, Any]:
        """Token attributions (grad x input, integrated gradients, occlusion, attention, rollout) for
        one text: graft explain's numbers, for classification, token classification and QA."""
        s = state.model()
        if s.exported:
            raise HTTPError(
                400, f"/explain needs gradients: serve the model folder, not the {s.backend} export"
            )
        if s.task not in TASKS:
            raise HTTPError(
                400, f"/explain serves {', '.join(TASKS)} models; for this {s.task} model run graft explain"
            )
        item = body.model_dump(include={"text", "context", "target", "position"})
        options = {"method": body.method, "steps": body.steps}
        enc = s.tokenizer.encode(
            body.text, body.context, truncation=False, padding=False, return_tensors=None
        )
        try:
            (result,) = await state.on_queue("explain", [item], [len(enc.input_ids[0])], options)
        except GraftError as e:  # graft.interpret names the CLI's flags: here they are the body's fields
            message = str(e)
            for field in ("target", "position", "context", "text"):
                message = message.replace(f"--{field} ", f"{field} ")
            raise HTTPError(422, message) from None
        return result
