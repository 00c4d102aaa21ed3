"""Pushing an aligned adapter to the Hugging Face Hub with a model card.

The token comes from the standard ``huggingface_hub`` login (``HF_TOKEN`` or ``hf auth login``);
it is checked before any work starts and never printed or written anywhere. An adapter trained
from a local folder records that folder as its base model; the pushed copy names the Hub id
instead, so ``AutoPeftModelForCausalLM.from_pretrained(repo)`` works for anyone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ModelCardInfo", "card_info_from_adapter", "render_model_card", "push_adapter", "HubError"]


class HubError(RuntimeError):
    """A push that cannot start (no token, bad folder) or that the Hub refused."""


@dataclass
class ModelCardInfo:
    """What the card reports; every field is optional except the base model."""

    base_model: str
    dataset: str | None = None
    k: int | None = None
    reward_model: str | None = None
    transform: str | None = None
    t: float | None = None
    beta: float | None = None  # the trainer's β, for Φ rescaled to span 1 on [0, 1] (ctrl_build.json's beta)
    phi_scale: float | None = None  # the span of the raw Φ on [0, 1], by which Φ was divided
    unscaled_beta: float | None = None  # beta × phi_scale: the same policy's β for the raw Φ (the planner's)
    inference: str | None = None
    n: int | None = None
    win_rates: list[dict] = field(default_factory=list)  # rows of an eval report's "win_rates"
    kl: float | None = None
    plots: list[str] = field(default_factory=list)  # image files to upload beside the adapter and show
    command: str | None = None


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:.4g}"


def _procedure_label(inference: str | None) -> str:
    """``best-of-N`` for a registered procedure's name, the name itself for an unknown one."""
    from ctrl_offline.maths.procedures import get_procedure, procedure_names

    if not inference:
        return "plain sampling"
    return get_procedure(inference).description if inference in procedure_names() else inference


def render_model_card(info: ModelCardInfo, repo_id: str) -> str:
    """A Markdown model card with Hub metadata (base model, dataset, tags)."""
    meta = {"base_model": info.base_model, "library_name": "peft",
            "tags": ["ctrl-offline", "trl", "dpo", "lora", "inference-aware-alignment"]}
    if info.dataset:
        meta["datasets"] = [info.dataset]
    header = "---\n" + "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items()) + "\n---\n"
    procedure = _procedure_label(info.inference)
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"A LoRA adapter for [`{info.base_model}`](https://huggingface.co/{info.base_model}) aligned with "
        "[ctrl-offline](https://github.com/) for "
        f"**{procedure}{'' if info.n is None else f' with N = {info.n}'}** decoding: offline KL-regularised "
        "alignment on a calibrated and transformed reward (InfAlign-CTRL).",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{info.base_model}` |",
    ]
    unscaled_beta = info.unscaled_beta
    if unscaled_beta is None and info.beta is not None and info.phi_scale is not None:
        unscaled_beta = info.beta * info.phi_scale
    for label, value in (("dataset", info.dataset), ("reference samples per prompt (K)", info.k),
                         ("reward model", info.reward_model), ("transform", info.transform),
                         ("t", info.t), ("β (`beta`, for Φ rescaled to span 1)", _number(info.beta)),
                         ("Φ scale (`phi_scale`)", _number(info.phi_scale)),
                         ("raw-Φ β (`unscaled_beta`)", _number(unscaled_beta))):
        if value is not None:
            lines.append(f"| {label} | `{value}` |")
    if info.beta is not None and info.phi_scale is not None:
        lines += ["", "The policy is π ∝ π_ref·exp(Φ(u)/β) on the calibrated reward u: `beta` is β for Φ divided by "
                  "`phi_scale` so that it spans 1 on [0, 1] (what the trainer used), and `unscaled_beta` = beta × "
                  "phi_scale is the same policy's β for the raw Φ (what the planner reports)."]
    if info.win_rates or info.kl is not None:
        lines += ["", "## Evaluation", ""]
        if info.kl is not None:
            lines.append(f"KL(π ‖ π_ref) ≈ {info.kl:.4f} nats.\n")
        if info.win_rates:
            lines += ["| selector | N | win rate vs reference | 95% CI |", "|---|---|---|---|"]
            lines += [f"| {r['selector']} | {r['n']} | {r['value']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] |"
                      for r in info.win_rates]
    for plot in info.plots:
        lines += ["", f"![{Path(plot).stem}]({Path(plot).name})"]
    if info.command:
        lines += ["", "## Reproduce", "", "```bash", info.command, "```"]
    lines += ["", "## Use", "", "```python", "from peft import AutoPeftModelForCausalLM", "",
              f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")', "```", ""]
    return header + "\n".join(lines)


def card_info_from_adapter(adapter_dir: str | os.PathLike, report: dict | None = None) -> ModelCardInfo:
    """What a card says about an adapter written by ``ctrl-data train``, read from its folder.

    The base model from ``ctrl_train.json`` (else ``adapter_config.json``); transform, t, the βs,
    K and the procedure planned for from the build's ``ctrl_build.json`` beside it; win rates and KL
    from an evaluation ``report`` (``ctrl-data eval``'s report.json) when given.
    """
    adapter_dir = Path(adapter_dir)

    def read(name: str) -> dict:
        path = adapter_dir / name
        return json.loads(path.read_text()) if path.is_file() else {}

    build, trained, config = read("ctrl_build.json"), read("ctrl_train.json"), read("adapter_config.json")
    base = trained.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise HubError(f"{adapter_dir} names no base model (no ctrl_train.json or adapter_config.json)")
    planner = build.get("planner") or {}
    report = report or {}
    return ModelCardInfo(
        base_model=base, k=build.get("k"), transform=build.get("transform"), t=build.get("t"), beta=build.get("beta"),
        phi_scale=build.get("phi_scale"), unscaled_beta=build.get("unscaled_beta"), inference=planner.get("inference"),
        n=planner.get("n"), win_rates=report.get("win_rates") or [], kl=(report.get("kl") or {}).get("value"))


def resolve_token(token: str | None = None) -> str:
    """The explicit token, else the standard login's; HubError before any work when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN before pushing")
    return token


def push_adapter(adapter_dir: str | os.PathLike, repo_id: str, info: ModelCardInfo | None = None, *, private: bool = True,
                 revision: str | None = None, dataset_dir: str | os.PathLike | None = None,
                 token: str | None = None, commit_message: str = "Upload CTRL adapter") -> str:
    """Upload the PEFT adapter folder (with tokenizer files, plots and a model card); returns the commit URL.

    ``info`` defaults to what the folder itself records (:func:`card_info_from_adapter`).
    ``dataset_dir`` (optional) is pushed to a dataset repo of the same name. The token is resolved
    first, so a missing login fails before any file is staged or any request is made.
    """
    token = resolve_token(token)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise HubError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    info = info if info is not None else card_info_from_adapter(adapter_dir)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "adapter"
        shutil.copytree(adapter_dir, staged)
        for plot in info.plots:
            shutil.copy(plot, staged / Path(plot).name)
        config = json.loads((staged / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = info.base_model  # not the local folder it was trained from
        (staged / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (staged / "README.md").write_text(render_model_card(info, repo_id))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision:
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=str(staged), revision=revision,
                                       commit_message=commit_message)
            if dataset_dir is not None:
                api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
                api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(dataset_dir),
                                  commit_message="Upload the calibrated training set")
        except Exception as err:  # network or Hub errors: say where, never echo the token
            raise HubError(f"pushing to {repo_id!r} failed: {type(err).__name__}: {err}") from err
    return str(getattr(commit, "commit_url", commit))
