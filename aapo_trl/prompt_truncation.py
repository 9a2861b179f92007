"""``max_prompt_length``: prompts cut to their last tokens, as the papers' TRL 0.16 cut them.

TRL 0.16's ``GRPOTrainer._generate_and_score_completions`` (and the AAPO authors' override of it, which samples
the reference on the same ids) tokenized the prompts left-padded and kept ``prompt_ids[:, -max_prompt_length:]``:
the first tokens (system prompt, start of the question) go, the end (the question's end and the generation
prompt) stays. TRL 1.16 has no such setting; :class:`aapo_trl.trainers.base.AdvantageTrainerMixin` applies this
function to the unpadded ids TRL's ``_tokenize_prompts`` returns, which is the same cut.
"""

from __future__ import annotations

from collections.abc import Sequence


def keep_last_tokens(prompt_ids: Sequence[Sequence[int]], max_length: int) -> tuple[list[list[int]], int]:
    """Each prompt's last ``max_length`` token ids, and how many prompts were cut."""
    if max_length < 1:
        raise ValueError(f"max_prompt_length must be a positive number of tokens, got {max_length}")
    kept = [list(ids)[-max_length:] for ids in prompt_ids]
    return kept, sum(len(ids) > max_length for ids in prompt_ids)
