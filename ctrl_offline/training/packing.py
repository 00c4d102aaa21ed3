"""Padding-free batches: sequences packed end to end, position ids restarting at each (docs/trainer_benchmark.md).

A padded batch pays for its longest sequence in every row; a packed one pays for the real tokens
only. Sequences are laid end to end in a row, each with position ids 0, 1, …, and no attention
mask: the position ids alone say where one sequence ends, which is how transformers keeps packed
sequences apart — FlashAttention's variable-length kernels (one row, ``cu_seqlens`` from the position
ids) and, for the ``eager`` and ``sdpa`` attentions, a block-diagonal causal mask built from them
(``masking_utils.find_packed_sequence_indices``). ``tests/test_packing.py`` checks that packed
log-probs equal those of each sequence alone.

Under FlashAttention everything goes in one row (its packed path takes batch size 1). The other
attentions compare every query with every key of a row, so one huge row would cost the square of
the batch's tokens: there the sequences go into as many rows as ``row_tokens`` tokens a row takes,
balanced (longest first, each to the emptiest row), and the rows' tails are filled with a padding
segment of its own positions, never a target. A small ``row_tokens`` is a length-bucketed padded
batch (one sequence a row); a large one trades padding for attention over longer rows.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch

__all__ = ["PACKING_ATTENTIONS", "ONE_ROW_ATTENTIONS", "DEFAULT_ROW_TOKENS", "check_packing_attention",
           "pack_sequences", "packed_sequence_logps", "row_tokens_for"]

#: Attention implementations that keep packed sequences apart given position ids and no mask.
PACKING_ATTENTIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
#: Those whose packed path takes one row (FlashAttention's variable-length kernels).
ONE_ROW_ATTENTIONS = ("flash_attention_2", "flash_attention_3")
#: Tokens per packed row for the attentions that mask a whole row (eager, sdpa, flex).
DEFAULT_ROW_TOKENS = 512


def _attention(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def check_packing_attention(model) -> str:
    """The model's attention implementation, once checked to keep packed sequences apart (else ValueError)."""
    attention = _attention(model)
    if attention is None or attention in PACKING_ATTENTIONS or "flash" in str(attention):
        return attention or "sdpa"
    raise ValueError(f"padding-free batches need an attention that keeps packed sequences apart by their position ids "
                     f"({', '.join(PACKING_ATTENTIONS)}); the model uses {attention!r}. Load it with one of those "
                     "(attn_implementation=...), or train with padded batches")


def row_tokens_for(model, row_tokens: int | None) -> int | None:
    """Tokens per packed row: None (one row) under FlashAttention, else ``row_tokens`` or :data:`DEFAULT_ROW_TOKENS`."""
    attention = check_packing_attention(model)
    if attention in ONE_ROW_ATTENTIONS or "flash" in attention:
        return None
    return row_tokens or DEFAULT_ROW_TOKENS


def _rows(lengths: list[int], row_tokens: int | None) -> list[list[int]]:
    """Sequence indices per row: all in one (``row_tokens`` None), else as many rows as ``row_tokens`` per row
    needs, balanced (longest first, each to the emptiest row), so the rows' common width wastes little."""
    if row_tokens is None:
        return [list(range(len(lengths)))]
    count = min(len(lengths), max(1, -(-sum(lengths) // row_tokens)))
    heap = [(0, r) for r in range(count)]
    rows: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        load, r = heapq.heappop(heap)
        rows[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return [row for row in rows if row]


def pack_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *, max_length: int | None = None,
                   row_tokens: int | None = None, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) pairs packed without padding between them.

    Each sequence is prompt + completion, cut to its first ``max_length`` tokens as TRL's collators
    do. Returns ``input_ids``, ``position_ids``, ``completion_mask`` (1 on completion tokens) and
    ``sequence_index`` (the sequence each token belongs to; −1 on a row's tail padding), all of shape
    (rows, width), and ``sequence_lengths`` (S,). The first token of every sequence is a prompt
    token, so no target is predicted across a boundary.
    """
    if not sequences:
        raise ValueError("nothing to pack: no sequences")
    ids, masks = [], []
    for prompt, completion in sequences:
        if not len(prompt):
            raise ValueError("a packed sequence needs a prompt token to predict its completion from")
        seq = [*prompt, *completion]
        mask = [0] * len(prompt) + [1] * len(completion)
        if max_length is not None:
            seq, mask = seq[:max_length], mask[:max_length]
        ids.append(seq)
        masks.append(mask)
    lengths = [len(s) for s in ids]
    rows = _rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    sequence_index = torch.full(shape, -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + lengths[i]
            input_ids[r, start:end] = torch.tensor(ids[i])
            position_ids[r, start:end] = torch.arange(lengths[i])
            completion_mask[r, start:end] = torch.tensor(masks[i])
            sequence_index[r, start:end] = i
            start = end
        position_ids[r, start:] = torch.arange(width - start)  # the tail: a segment of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "completion_mask": completion_mask,
            "sequence_index": sequence_index, "sequence_lengths": torch.tensor(lengths)}


def packed_sequence_logps(model, batch: dict) -> torch.Tensor:
    """Σ log π of each packed sequence's completion tokens, shape (S,), in one forward of the packed rows.

    Uses the fused LM head TRL's trainers add (``fused_lm_head=True``: log-probs of the target tokens
    only, no (tokens × vocabulary) logits).
    """
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    outputs = model(input_ids=input_ids, position_ids=batch["position_ids"], labels=labels, use_cache=False,
                    fused_lm_head=True)
    per_token = outputs.log_probs[:, -(input_ids.size(1) - 1):]  # prompt-learning PEFT prepends virtual tokens
    index = batch["sequence_index"][:, 1:]
    num = batch["sequence_lengths"].size(0)
    slot = index.masked_fill(index < 0, num).reshape(-1)  # the tail padding goes to a slot of its own, dropped
    sums = per_token.new_zeros(num + 1).index_add(0, slot, per_token.reshape(-1))
    return sums[:num]
