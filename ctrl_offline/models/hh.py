"""Anthropic HH-RLHF dialogues → chat prompts.

HH rows hold a whole dialogue as text (``"\\n\\nHuman: …\\n\\nAssistant: …"``). The prompt of a
row is every turn before the last assistant answer, as chat messages; the answer itself is not
used (CTRL draws its own reference samples).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

__all__ = ["EMBEDDED_HH", "dialogue_to_messages", "hh_prompts", "resolve_dataset"]

EMBEDDED_HH = "embedded:hh-tiny"
_TURN = re.compile(r"\n\n(Human|Assistant): ")


def dialogue_to_messages(text: str) -> list[dict]:
    """Chat messages of every turn before the final assistant answer of an HH dialogue."""
    parts = _TURN.split(text)
    # split gives ["<before first turn>", role, content, role, content, …]
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]
    if not turns:
        raise ValueError(f"not an HH dialogue (no '\\n\\nHuman: ' turns): {text[:80]!r}")
    if turns[-1][0] == "Assistant":
        turns = turns[:-1]
    if not turns or turns[-1][0] != "Human":
        raise ValueError(f"HH dialogue does not end with a human turn before the answer: {text[:80]!r}")
    return [{"role": "user" if role == "Human" else "assistant", "content": content} for role, content in turns]


def resolve_dataset(name: str) -> str:
    """``embedded:hh-tiny`` → the folder shipped in the package; anything else unchanged."""
    if name == EMBEDDED_HH:
        return str(resources.files("ctrl_offline") / "data" / "hh-tiny")
    if name.startswith("embedded:"):
        raise ValueError(f"unknown embedded dataset {name!r}; the embedded dataset is {EMBEDDED_HH!r}")
    return name


def hh_prompts(name: str, subsets: list[str], split: str, limit: int | None = None,
               column: str = "chosen") -> list[list[dict]]:
    """Unique prompts (chat messages) from the HH subsets, in dataset order, at most ``limit``."""
    import datasets

    from ctrl_offline.models.embedded import load_error_message

    source = resolve_dataset(name)
    prompts, seen = [], set()
    for subset in subsets:
        try:
            if Path(source).is_dir():
                folder = Path(source) / subset
                files = sorted(folder.glob(f"{split}.json*"))
                if not files:
                    raise FileNotFoundError(f"no {split}.jsonl under {folder}")
                dataset = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
            else:
                dataset = datasets.load_dataset(source, data_dir=subset, split=split)
        except (OSError, ValueError, ConnectionError) as err:
            raise OSError(load_error_message("dataset", f"{name} ({subset}, {split})", err, EMBEDDED_HH)) from err
        if column not in dataset.column_names:
            raise ValueError(f"dataset {name!r} ({subset}) has no column {column!r}; columns: {dataset.column_names}")
        for text in dataset[column]:
            messages = dialogue_to_messages(text)
            key = tuple((m["role"], m["content"]) for m in messages)
            if key not in seen:
                seen.add(key)
                prompts.append(messages)
            if limit and len(prompts) >= limit:
                return prompts
    return prompts
