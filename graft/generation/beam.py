"""Beam search: the best of ``num_beams`` hypotheses per row, as transformers' beam search."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from graft.generation.config import GenerationConfig
from graft.generation.decoder import Decoder, resolve, seen_tokens, start
from graft.generation.processors import process
from graft.tasks import TaskModel


@torch.inference_mode()
def beam_search(
    model: TaskModel,
    input_ids: torch.Tensor | None,  # (B, T)
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    decoder_input_ids: torch.Tensor | None = None,  # (B, T') an encoder-decoder's forced first tokens
    input_features: torch.Tensor | None = None,  # (B, mel bins, frames) for an audio encoder
    **changes: Any,
) -> torch.Tensor:
    """The best of ``num_beams`` hypotheses per row: (B, T + new).

    Each step extends every live beam by every token, keeps the best 2 * num_beams (more with
    several eos tokens) candidates, moves those ending in eos to the finished list (scored
    sum(log p) / length ** length_penalty) and goes on with the best num_beams others; the
    cache follows the surviving beams through ``KVCache.reorder``. Same algorithm and stopping
    rule as transformers' beam search, so the same tokens.
    """
    config = resolve(config, model, changes)
    # an encoder-decoder's encoder runs once here, for B rows; its output follows the beams
    decoder, input_ids = start(model, input_ids, attention_mask, config, decoder_input_ids, input_features)
    mask = decoder.mask[:, : input_ids.shape[1]] if isinstance(decoder, Decoder) else None
    B, K, N = input_ids.shape[0], config.num_beams, config.max_new_tokens
    device = input_ids.device
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=device)
    C = max(2, 1 + len(eos)) * K  # candidates kept per row: enough to go on when the best K end
    top_k_mask = torch.arange(C, device=device) < K  # only the best K candidates may finish
    big = -1.0e9
    lp, early = config.length_penalty, config.early_stopping

    logits = decoder.prefill()
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B*K,) every beam starts from its prompt
    decoder.reorder(rows)
    logits = logits.index_select(0, rows)
    seen = seen_tokens(input_ids, mask, model.config.vocab_size).index_select(0, rows)
    prompts = input_ids.index_select(0, rows)  # (B*K, T)

    running = torch.full((B, K, N), config.pad_id, dtype=torch.long, device=device)  # new tokens per beam
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = big  # all beams are equal at first: let only the first one expand
    finished = running.clone()
    finished_scores = torch.full((B, K), big, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)

    for step in range(N):
        if step:
            logits = decoder.step(running[:, :, step - 1].reshape(-1))
        sequences = torch.cat([prompts, running[:, :, :step].reshape(B * K, step)], dim=1)  # (B*K, T + step)
        log_probs = process(F.log_softmax(logits, dim=-1), seen, config, sequences, step)  # (B*K, V)
        V = log_probs.shape[-1]
        totals = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_scores, top_index = torch.topk(totals, C)  # (B, C)
        beam, token = top_index // V, top_index % V
        candidates = running.gather(1, beam[:, :, None].expand(B, C, N)).clone()  # (B, C, N)
        candidates[:, :, step] = token
        ends = torch.isin(token, eos) if step + 1 < N else torch.ones_like(token, dtype=torch.bool)

        # the best K candidates that go on
        alive_scores = top_scores + ends.float() * big
        keep = torch.topk(alive_scores, K).indices  # (B, K)
        running = candidates.gather(1, keep[:, :, None].expand(B, K, N))
        running_scores = alive_scores.gather(1, keep)
        source = (beam.gather(1, keep) + batch_offset).view(-1)  # (B*K,) which old beam each one extends

        # candidates that ended join the finished list when they beat its worst member
        scores = top_scores / ((step + 1) ** lp)
        full = is_finished.all(-1, keepdim=True) & (early is True)
        scores = scores + full.float() * big + (~improvable).float() * big
        just_finished = ends & top_k_mask
        scores = scores + (~just_finished).float() * big
        merged_scores = torch.cat([finished_scores, scores], dim=1)  # (B, K + C)
        best = torch.topk(merged_scores, K).indices  # (B, K)
        finished = torch.cat([finished, candidates], dim=1).gather(1, best[:, :, None].expand(B, K, N))
        finished_scores = merged_scores.gather(1, best)
        lengths = torch.cat([finished_lengths, torch.full_like(scores, step + 1, dtype=torch.long)], dim=1)
        finished_lengths = lengths.gather(1, best)
        is_finished = torch.cat([is_finished, just_finished], dim=1).gather(1, best)

        # stop when no live beam can beat the worst finished one (transformers' heuristic), or all ended
        length = N if early == "never" and lp > 0 else step + 1
        best_possible = running_scores[:, :1] / (length**lp)
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, big)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        if not bool(improvable.any()) or (bool(is_finished.all()) and early is True) or bool(ends.all()):
            break
        decoder.reorder(source)
        seen = seen.index_select(0, source).scatter_(1, running[:, :, step].reshape(-1, 1), True)

    best_len = int(finished_lengths[:, 0].max())
    return torch.cat([input_ids, finished[:, 0, :best_len]], dim=1)
