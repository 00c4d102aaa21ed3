"""Loading the policy for training: QLoRA (4-bit NF4 base + LoRA) or a full-precision base + LoRA.

QLoRA follows Dettmers et al. (2023): NF4 weights with double quantisation, bf16 compute,
``prepare_model_for_kbit_training`` (norms in fp32, input grads for checkpointing), LoRA on
every attention and MLP projection, gradient checkpointing. bitsandbytes ≥ 0.45 also runs NF4
on CPU, so the same path is exercised without a GPU. Adapters save as standard PEFT folders.

An adapter can also be trained further (an on-policy round, docs/rounds.md): :func:`saved_lora_settings`
reads the LoRA shape a saved adapter fixes, :func:`continued_lora_config` gives its ``LoraConfig``
ready for training, and :func:`load_adapter_weights` copies its weights into a model wrapped with that
config (every LoRA weight must match by name and shape).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ctrl_offline.models.embedded import load_error_message, resolve_model

__all__ = ["ModelLoadingConfig", "QuantizationUnavailable", "load_policy", "lora_config", "bitsandbytes_available",
           "saved_lora_settings", "continued_lora_config", "load_adapter_weights"]

logger = logging.getLogger(__name__)

# Attention and MLP projections of Llama/Mistral/Qwen-style decoders.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class QuantizationUnavailable(RuntimeError):
    """4-bit loading was asked for where bitsandbytes cannot run it."""


@dataclass
class ModelLoadingConfig:
    """How to load the base model and shape its adapter."""

    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of the reference (base) model."})
    load_in_4bit: bool = field(default=True, metadata={"help": "QLoRA: quantise the base to 4-bit NF4."})
    allow_full_precision_fallback: bool = field(
        default=False, metadata={"help": "If 4-bit cannot run here, load the base in full precision instead of failing."}
    )
    torch_dtype: str = field(default="auto", metadata={"help": "Dtype of non-quantised weights: auto, bfloat16, float32."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling α."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules given adapters (default: attention and MLP projections)."}
    )
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations in the backward pass."})
    trust_remote_code: bool = False


def bitsandbytes_available() -> tuple[bool, str]:
    """Whether bitsandbytes can run 4-bit NF4 here, and why not when it cannot."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.functional import quantize_4bit
    except Exception as err:  # ImportError, or a broken native library
        return False, f"bitsandbytes cannot be imported ({err})"
    try:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        quantize_4bit(torch.ones(64, dtype=torch.float32, device=device), quant_type="nf4")
    except Exception as err:
        return False, f"bitsandbytes cannot quantise to NF4 on {device} ({err})"
    return True, ""


def _compute_dtype() -> torch.dtype:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    # On CPU, bf16 compute is slow and lossy for the tiny matmuls of tests; fp32 is the safe default.
    return torch.float32 if not torch.cuda.is_available() else torch.float16


def lora_config(config: ModelLoadingConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or DEFAULT_LORA_TARGETS,
        task_type="CAUSAL_LM",
    )


def load_policy(config: ModelLoadingConfig):
    """The base model ready for LoRA training, and the ``LoraConfig`` to hand to the trainer.

    The trainer wraps the model with PEFT; its reference is the same base with the adapter
    disabled, so no second copy is ever loaded.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"trust_remote_code": config.trust_remote_code}
    quantised = False
    if config.load_in_4bit:
        ok, why = bitsandbytes_available()
        if ok:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=_compute_dtype(),
            )
            quantised = True
        elif config.allow_full_precision_fallback:
            logger.warning("4-bit loading is unavailable (%s); loading the base in full precision instead", why)
        else:
            raise QuantizationUnavailable(
                f"load_in_4bit=True but {why}. Install a bitsandbytes build for this machine "
                "(pip install 'ctrl-offline[qlora]'), set load_in_4bit=False, "
                "or allow_full_precision_fallback=True to train a full-precision base with LoRA."
            )
    if not quantised and config.torch_dtype != "auto":
        kwargs["dtype"] = getattr(torch, config.torch_dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(config.model_name_or_path), **kwargs)
    except OSError as err:
        raise OSError(load_error_message("model", config.model_name_or_path, err)) from err
    if quantised:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model, lora_config(config)


def saved_lora_settings(adapter_dir) -> dict:
    """The :class:`ModelLoadingConfig` LoRA fields a saved PEFT adapter was trained with: ``lora_r``, ``lora_alpha``,
    ``lora_dropout``, ``lora_target_modules`` (a sorted list, or the saved pattern string).

    Raises ValueError for a folder without ``adapter_config.json`` or an adapter that is not LoRA.
    """
    import json
    from pathlib import Path

    path = Path(adapter_dir) / "adapter_config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the adapter config {path}: {err}") from err
    if saved.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir} holds a {saved.get('peft_type')} adapter: only LoRA adapters are trained "
                         "further")
    targets = saved.get("target_modules")
    return {"lora_r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "lora_dropout": saved.get("lora_dropout"),
            "lora_target_modules": sorted(targets) if isinstance(targets, (list, tuple)) else targets}


def continued_lora_config(adapter_dir, lora_dropout: float | None = None):
    """The ``LoraConfig`` a saved adapter was trained with, set for training (not inference); ``lora_dropout``
    replaces its dropout when given (the only setting that does not change what its weights mean)."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False
    if lora_dropout is not None:
        config.lora_dropout = lora_dropout
    return config


def load_adapter_weights(model, adapter_dir, adapter_name: str = "default") -> None:
    """Copy a saved adapter's weights into ``model`` (a PEFT model whose ``adapter_name`` adapter has the same
    config), in place; they stay trainable. Raises ValueError when a LoRA weight is missing on either side or has
    another shape."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    device = next(model.parameters()).device
    weights = load_peft_weights(str(adapter_dir), device=str(device))
    try:
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    except RuntimeError as err:  # size mismatches
        raise ValueError(f"the weights of {adapter_dir} do not fit the adapter being trained: {err}") from err
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        shown = ", ".join([*missing[:2], *list(result.unexpected_keys)[:2]])
        raise ValueError(f"the weights of {adapter_dir} do not match the adapter being trained ({len(missing)} LoRA "
                         f"weight(s) missing, {len(result.unexpected_keys)} unexpected, e.g. {shown})")
