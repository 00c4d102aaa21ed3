"""Where a recipe's prompts come from: the training, held-out evaluation and KL-estimate splits.

A prompt source is anything ``ctrl-data sample`` reads (a JSONL/JSON/Parquet/CSV/TXT file, a
``datasets`` folder, a Hub dataset id) or, by default, an hh-rlhf-layout dataset. The functions
take any object with the :class:`~ctrl_offline.pipeline.recipe.RecipeConfig` fields they read
(``prompts``, ``dataset_name``, ``dataset_subsets``, ``prompt_column``, ``eval_prompts``,
``train_split``, ``eval_split``, ``num_train_prompts``, ``num_eval_prompts``, ``kl_eval_prompts``).
No evaluation prompt is ever trained on, and the KL estimate uses prompts that are neither.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

__all__ = ["prompt_source", "prompt_splits", "kl_prompts", "write_prompts", "read_prompts", "unique_prompts",
           "has_split"]

logger = logging.getLogger(__name__)


def write_prompts(path: Path, prompts: list) -> None:
    """``path/prompts.jsonl``, one ``{"prompt": ...}`` a line, written atomically."""
    from ctrl_offline.io.files import atomic_output_dir

    with atomic_output_dir(Path(path), overwrite=False) as tmp:
        with open(tmp / "prompts.jsonl", "w", encoding="utf-8") as f:
            for p in prompts:
                f.write(json.dumps({"prompt": p}) + "\n")


def read_prompts(path: Path) -> list:
    """The prompts of a ``prompts.jsonl`` written by :func:`write_prompts`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def unique_prompts(prompts: list) -> list:
    """The prompts in order, each once (by prompt id)."""
    from ctrl_offline.models.generation import prompt_id

    seen, kept = set(), []
    for p in prompts:
        if prompt_id(p) not in seen:
            seen.add(prompt_id(p))
            kept.append(p)
    return kept


def has_split(source: str, split: str) -> bool:
    """Whether a prompt source holds ``split`` (a file holds none; a plain datasets folder neither)."""
    import datasets

    path = Path(source)
    if path.is_file():
        return False
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            return isinstance(loaded, datasets.DatasetDict) and split in loaded
        return split in datasets.get_dataset_split_names(source)
    except Exception:  # unreadable here: the training load says why
        return False


def prompt_source(recipe, seed: int) -> tuple[list, list]:
    """(the prompts training draws from, in the order it takes them; the held-out evaluation prompts).

    hh-rlhf layout: the train and eval splits in dataset order. Any other source (``prompts``): its
    ``train_split``, held out against ``eval_prompts``, else its ``eval_split`` when it has one, else
    ``num_eval_prompts`` taken out of it by a shuffle seeded with ``seed``.
    """
    if recipe.prompts is None:
        from ctrl_offline.models.hh import hh_prompts

        limit = recipe.num_train_prompts + recipe.num_eval_prompts + recipe.kl_eval_prompts
        pool = hh_prompts(recipe.dataset_name, recipe.dataset_subsets, recipe.train_split, limit)
        return pool, hh_prompts(recipe.dataset_name, recipe.dataset_subsets, recipe.eval_split, recipe.num_eval_prompts)
    import numpy as np

    from ctrl_offline.stages.sample import load_prompts

    column = recipe.prompt_column
    pool = unique_prompts(load_prompts(recipe.prompts, column=column, split=recipe.train_split))
    if recipe.eval_prompts is not None:
        held_out = load_prompts(recipe.eval_prompts, column=column, split=recipe.eval_split)
    elif has_split(recipe.prompts, recipe.eval_split):
        held_out = load_prompts(recipe.prompts, column=column, split=recipe.eval_split)
    else:
        order = np.random.default_rng(seed).permutation(len(pool))
        pool = [pool[i] for i in order]
        held_out, pool = pool[: recipe.num_eval_prompts], pool[recipe.num_eval_prompts:]
        logger.info("%s has no %s split: %d prompts held out by a shuffle seeded with %d", recipe.prompts,
                    recipe.eval_split, len(held_out), seed)
    return pool, unique_prompts(held_out)[: recipe.num_eval_prompts]


def prompt_splits(recipe, seed: int) -> tuple[list, list]:
    """(training prompts, held-out evaluation prompts): no evaluation prompt is trained on.

    Raises :class:`~ctrl_offline.pipeline.recipe.RecipeError` when a split is empty.
    """
    from ctrl_offline.models.generation import prompt_id
    from ctrl_offline.pipeline.recipe import RecipeError

    pool, held_out = prompt_source(recipe, seed)
    evaluated = {prompt_id(p) for p in held_out}
    train = [p for p in pool if prompt_id(p) not in evaluated][: recipe.num_train_prompts]
    where = recipe.prompts or f"{recipe.dataset_name} ({', '.join(recipe.dataset_subsets)})"
    if not train or not held_out:
        raise RecipeError(f"no prompts in {where} for the {'training' if not train else 'evaluation'} split")
    if len(train) < recipe.num_train_prompts or len(held_out) < recipe.num_eval_prompts:
        logger.warning("%s gives %d training and %d evaluation prompts (asked: %d and %d)", where, len(train),
                       len(held_out), recipe.num_train_prompts, recipe.num_eval_prompts)
    return train, held_out


def kl_prompts(recipe, prompts_dir: Path, seed: int = 0) -> tuple[list, str]:
    """The prompts of the KL estimate while training, and where they come from.

    ``prompts_dir`` holds the ``train/`` and ``eval/`` splits written by :func:`write_prompts`.
    The training source's prompts past the training ones, less any evaluation prompt: neither
    trained on nor evaluated on. A source with fewer than 2 of those (the embedded hh-tiny, all 36
    of whose prompts the tiny config trains on) leaves the first training prompts, with a warning.
    """
    from ctrl_offline.models.generation import prompt_id

    prompts_dir = Path(prompts_dir)
    train = read_prompts(prompts_dir / "train" / "prompts.jsonl")
    evaluated = read_prompts(prompts_dir / "eval" / "prompts.jsonl")
    taken = {prompt_id(p) for p in train + evaluated}
    pool, _ = prompt_source(recipe, seed)
    held_out = [p for p in pool if prompt_id(p) not in taken][: recipe.kl_eval_prompts]
    split = recipe.prompts or f"{recipe.train_split} split"
    if len(held_out) >= 2:
        if len(held_out) < recipe.kl_eval_prompts:
            logger.warning("only %d held-out prompts for the KL estimate (kl_eval_prompts=%d)", len(held_out),
                           recipe.kl_eval_prompts)
        return held_out, f"{split}, past the training prompts"
    logger.warning("no held-out prompts left in the %s past the %d training prompts: the KL held to the budget "
                   "is estimated on the first %d training prompts", split, len(train),
                   min(len(train), recipe.kl_eval_prompts))
    return train[: recipe.kl_eval_prompts], "training prompts"
