"""Text a language model writes from fixed prompts, logged at every evaluation: a loss curve says the model
improves, a sample says what it has learnt (and shows a broken tokenizer or data pipeline at a glance).

Every rank runs the same greedy decoding: under ZeRO-3 a forward gathers partitioned weights with collectives, so
a forward on rank 0 alone would hang. Greedy decoding is deterministic, so the ranks agree; rank 0 logs it.
"""

from __future__ import annotations

from typing import Sequence

import torch

PROMPTS = ("The ", "Once upon a time")
NEW_TOKENS = 48


@torch.no_grad()
def greedy_continuation(model, prompt_ids: Sequence[int], new_tokens: int, block_size: int, device=None) -> list[int]:
    """`model(ids [1, L]) -> logits [1, L, V]`; the context is cropped to the last block_size tokens."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    for _ in range(new_tokens):
        logits = model(ids[:, -block_size:])
        ids = torch.cat([ids, logits[:, -1].float().argmax(dim=-1, keepdim=True).to(ids.dtype)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def generate_samples(engine, codec, block_size: int, prompts: Sequence[str] = PROMPTS, new_tokens: int = NEW_TOKENS) -> str:
    """One paragraph per prompt: the prompt, then the model's greedy continuation."""
    engine.eval()
    try:
        parts = []
        for prompt in prompts:
            prompt_ids = codec.encode(prompt)
            if not prompt_ids:
                continue
            continuation = greedy_continuation(engine, prompt_ids[-block_size:], new_tokens, block_size, engine.device)
            parts.append(f"--- prompt: {prompt!r}\n{prompt}{codec.decode(continuation)}\n")
        return "\n".join(parts)
    finally:
        engine.train()
