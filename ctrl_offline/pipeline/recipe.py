"""The recipe's configuration: what to align for, on which data, with which reward.

The pipeline itself — prompts → sample → score → calibrate → plan/build → train → evaluate → push,
each stage resumable, the run-folder guard and the summary — is the script
``recipes/ctrl_pipeline.py`` (run through ``recipes/hh_bon.py`` / ``recipes/hh_won.py``). This
module holds what any such script reuses: :class:`RecipeConfig` and its checks, the model
arguments (:data:`ModelArguments`, :func:`model_loading_config`) and :func:`parse_recipe_args`,
which reads the three dataclasses (``RecipeConfig``, ``ModelArguments`` and the training config:
:class:`~ctrl_offline.training.config.CTRLConfig` for pairs, :class:`~ctrl_offline.training.config.CTRLPointwiseConfig`
for pointwise) from a YAML file (``--config``) with command-line overrides, like TRL /
alignment-handbook scripts, and names the closest key of an unknown one. The prompt splits are in
:mod:`ctrl_offline.pipeline.prompts`, training in :func:`ctrl_offline.stages.train.train_from_build`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field

from ctrl_offline.training.config import CTRLConfig, CTRLGroupedConfig, CTRLPointwiseConfig
from ctrl_offline.models.modeling import ModelLoadingConfig
from ctrl_offline.rows.pairs import PAIR_STRATEGIES
from ctrl_offline.maths.procedures import procedure_names

__all__ = ["ModelArguments", "RecipeConfig", "RecipeError", "RECIPE_FORMATS", "check_loss", "model_loading_config",
           "parse_recipe_args"]

#: The build formats the recipe trains (``data_format``): grouped rows train any registered loss, each response
#: forwarded once per step (docs/trainer_benchmark.md).
RECIPE_FORMATS = ("pairs", "pointwise", "grouped")


class RecipeError(RuntimeError):
    """A run that cannot start: bad config, a run folder holding another config, no Hub token."""


@dataclass
class RecipeConfig:
    """What to align for, on which data, with which reward (the model and trainer have their own)."""

    dataset_name: str = field(default="Anthropic/hh-rlhf", metadata={
        "help": "Hub id or local folder in the hh-rlhf layout (<subset>/{train,test}.jsonl); embedded:hh-tiny ships here."})
    dataset_subsets: list[str] = field(default_factory=lambda: ["helpful-base"], metadata={
        "help": "hh-rlhf subsets (data_dir) to draw prompts from."})
    prompts: str | None = field(default=None, metadata={
        "help": "Any prompt source `ctrl-data sample` takes: a JSONL/JSON/Parquet/CSV/TXT file, a datasets folder or "
                "a Hub dataset id (with prompt_column and train_split). Default: dataset_name in the hh-rlhf layout."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts (with prompts)."})
    eval_prompts: str | None = field(default=None, metadata={
        "help": "Held-out evaluation prompts (any source, with prompts). Default: the source's eval_split when it "
                "has one, else num_eval_prompts held out of it by a shuffle seeded with seed."})
    train_split: str = field(default="train", metadata={"help": "Split the training prompts come from."})
    eval_split: str = field(default="test", metadata={"help": "Split the held-out evaluation prompts come from."})
    num_train_prompts: int = field(default=2000, metadata={"help": "Training prompts (unique, in dataset order)."})
    num_eval_prompts: int = field(default=200, metadata={"help": "Held-out evaluation prompts."})
    reward_model: str = field(default="OpenAssistant/reward-model-deberta-v3-large-v2", metadata={
        "help": "Reward: a single-score reward model (Hub id/folder), module:function, or `vader`."})
    num_samples: int = field(default=8, metadata={"help": "K, reference samples per prompt."})
    max_new_tokens: int = field(default=128, metadata={"help": "Longest sampled completion, in tokens."})
    sampling_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    inference: str = field(default="bon", metadata={
        "help": f"Inference-time procedure aligned for ({', '.join(procedure_names())}); one without a closed form "
                "is planned by simulation on the calibration tables."})
    inference_n: int = field(default=4, metadata={"help": "N, the candidates of the inference-time procedure."})
    kl_budget: float = field(default=0.5, metadata={"help": "KL(π‖π_ref) budget in nats; the planner picks t and β."})
    hold_kl: bool = field(default=True, metadata={
        "help": "Stop training when the adapter's KL reaches kl_budget, estimated on held-out prompts "
                "(docs/kl_budget.md)."})
    kl_eval_prompts: int = field(default=16, metadata={"help": "Held-out prompts of the KL estimate (hold_kl)."})
    kl_eval_samples: int = field(default=4, metadata={"help": "Policy samples per prompt of the KL estimate."})
    kl_every_n_steps: int = field(default=10, metadata={"help": "Optimizer steps between KL estimates."})
    transform: str | None = field(default=None, metadata={
        "help": "Transform family (identity, log, exp, negexp); default: the planner's best for the procedure."})
    data_format: str = field(default="pairs", metadata={
        "help": "pairs (DPO/IPO/distill), pointwise, or grouped (one row per prompt: any loss, each response "
                "forwarded once per step); the training config follows it (TRL's DPOConfig for pairs and grouped, "
                "SFTConfig for pointwise), and ctrl_loss must be a loss of that format (grouped: any)."})
    rounds: int = field(default=0, metadata={
        "help": "On-policy rounds after the reference samples (docs/rounds.md): each samples the current policy "
                "(round 1 the base, then the last round's adapter), calibrates the samples against the reference "
                "tables, builds pointwise targets and trains the adapter further; the last round's adapter is "
                "evaluated. Rounds train pointwise (data_format: pointwise, ctrl_loss: pointwise). 0: the offline "
                "pipeline, trained on the reference samples themselves."})
    round_samples: int | None = field(default=None, metadata={
        "help": "Policy samples per prompt in each round (default: num_samples)."})
    pair_strategy: str = field(default="all", metadata={"help": "all, best_vs_rest, best_vs_worst or sampled."})
    pairs_per_prompt: int | None = field(default=None, metadata={"help": "Pairs per prompt for pair_strategy=sampled."})
    keep_unfinished: bool = field(default=True, metadata={
        "help": "Train on completions cut at max_new_tokens too, as prefixes without EOS (false: leave them out)."})
    eval_n: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "N values evaluated."})
    eval_selectors: list[str] = field(default_factory=lambda: ["bon", "won"], metadata={
        "help": f"Selectors evaluated ({', '.join(procedure_names())})."})
    eval_policy_samples: int = field(default=16, metadata={
        "help": "m, policy samples per evaluation prompt (≥ max(eval_n)); every win rate is the U-statistic over "
                "all N-subsets of the m and M samples (docs/evaluation.md)."})
    eval_reference_samples: int = field(default=16, metadata={
        "help": "M, reference samples per evaluation prompt (≥ max(eval_n)), drawn once into "
                "<output_dir>/eval_reference_pool and reused from there."})
    eval_tilt_fidelity: bool = field(default=True, metadata={
        "help": "Measure the adapter's tilt fidelity on the reference samples (one more pass of both models over "
                "them; docs/diagnostics.md §5)."})
    push_dataset: bool = field(default=False, metadata={"help": "With --push_to_hub, also push the built dataset."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a run folder that holds another config."})

    def __post_init__(self):
        if self.inference not in procedure_names():
            raise RecipeError(f"unknown inference {self.inference!r}; choose from {', '.join(procedure_names())}")
        if self.data_format not in RECIPE_FORMATS:
            raise RecipeError(f"data_format must be one of {', '.join(RECIPE_FORMATS)}, got {self.data_format!r}")
        if self.pair_strategy not in PAIR_STRATEGIES:
            raise RecipeError(f"pair_strategy must be one of {', '.join(PAIR_STRATEGIES)}, got {self.pair_strategy!r}")
        for name in ("num_train_prompts", "num_eval_prompts", "inference_n", "max_new_tokens", "sampling_batch_size",
                     "kl_eval_prompts", "kl_eval_samples", "kl_every_n_steps"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.eval_n or any(int(n) != n or n < 1 for n in self.eval_n):
            raise RecipeError(f"eval_n must be positive integers, got {self.eval_n}")
        unknown = [name for name in self.eval_selectors if name not in procedure_names()]
        if unknown:
            raise RecipeError(f"unknown eval_selectors {unknown}; choose from {', '.join(procedure_names())}")
        least = max(max(self.eval_n), 2)
        for name in ("eval_policy_samples", "eval_reference_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < least:
                raise RecipeError(f"{name} must be an integer ≥ max(eval_n) = {max(self.eval_n)} (and ≥ 2), "
                                  f"got {value}")
        if self.num_samples < 2:
            raise RecipeError(f"num_samples (K) must be ≥ 2, got {self.num_samples}")
        if not (self.kl_budget > 0 and math.isfinite(self.kl_budget)):
            raise RecipeError(f"kl_budget must be a finite KL > 0 in nats, got {self.kl_budget}")
        if isinstance(self.rounds, bool) or int(self.rounds) != self.rounds or self.rounds < 0:
            raise RecipeError(f"rounds must be an integer ≥ 0 (0: the offline pipeline), got {self.rounds}")
        if self.rounds and self.data_format != "pointwise":
            raise RecipeError(f"rounds: {self.rounds} trains pointwise targets on the policy's own samples, not "
                              f"{self.data_format}: set data_format: pointwise and ctrl_loss: pointwise, or rounds: 0 "
                              f"to train offline on {self.data_format}")
        if self.round_samples is None:
            self.round_samples = self.num_samples
        if isinstance(self.round_samples, bool) or int(self.round_samples) != self.round_samples \
                or self.round_samples < 1:
            raise RecipeError(f"round_samples must be an integer ≥ 1, got {self.round_samples}")


# -- configuration --------------------------------------------------------------------------------
# The training config already has these two; the model's values are taken from it.
_FROM_TRAINING = ("gradient_checkpointing", "trust_remote_code")


def _copy_field(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=f.metadata)
    if f.default is not dataclasses.MISSING:
        return field(default=f.default, metadata=f.metadata)
    return field(metadata=f.metadata)


#: ModelLoadingConfig without the fields the training config owns (one parser cannot hold both).
ModelArguments = dataclasses.make_dataclass(
    "ModelArguments",
    [(f.name, f.type, _copy_field(f)) for f in dataclasses.fields(ModelLoadingConfig) if f.name not in _FROM_TRAINING],
)


def model_loading_config(model_args, training_args) -> ModelLoadingConfig:
    return ModelLoadingConfig(**dataclasses.asdict(model_args),
                              **{name: getattr(training_args, name) for name in _FROM_TRAINING})


def _field_names(types) -> list[str]:
    return [f.name for t in types for f in dataclasses.fields(t) if f.init]


def _unknown_key_message(keys: list[str], known: list[str], where: str) -> str:
    lines = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        lines.append(f"unknown config key {key!r} {where}" + (f"; did you mean {close[0]!r}?" if close else ""))
    return "\n".join(lines)


@dataclass
class _Loss:
    """The training config's ``ctrl_loss``, read with the recipe before the training config it belongs to."""

    ctrl_loss: str | None = None


def check_loss(recipe: RecipeConfig, loss: str) -> None:
    """Refuse a ``ctrl_loss`` that does not train the recipe's ``data_format`` (rounds: pointwise), naming the fix."""
    from ctrl_offline.maths.losses import get_loss, loss_names

    try:
        served = get_loss(loss).data_format
    except ValueError as err:
        raise RecipeError(f"ctrl_loss: {err}") from None
    if served == recipe.data_format or (recipe.data_format == "grouped" and not recipe.rounds):
        return
    if recipe.rounds:
        raise RecipeError(f"ctrl_loss {loss!r} trains {served} rows, but rounds: {recipe.rounds} trains pointwise "
                          "targets on the policy's own samples: set ctrl_loss: pointwise, or rounds: 0 (with "
                          f"data_format: {served}) to train offline")
    fitting = loss_names(recipe.data_format)
    fix = f"ctrl_loss: {fitting[0]}" if len(fitting) == 1 else f"ctrl_loss to one of {', '.join(fitting)}"
    other = f", or data_format: {served}" if served in RECIPE_FORMATS else ""
    raise RecipeError(f"ctrl_loss {loss!r} trains {served} rows, but data_format is {recipe.data_format}: set "
                      f"{fix}{other}")


def _parse(types, argv: list[str], defaults: dict | None, where: str):
    """``types`` from ``argv`` (and the YAML file it names); the keys ``types`` do not know, from the file and from
    the command line."""
    import yaml
    from trl import TrlParser

    parser = TrlParser(types)
    parser.allow_abbrev = False  # --num_sample must not silently mean --num_samples
    if defaults:
        parser.set_defaults_with_config(**defaults)
    try:
        *configs, from_file, from_cli = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True)
    except FileNotFoundError as err:
        raise RecipeError(f"config file not found: {err.filename}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"config file {where[3:]} is not valid YAML: {err}") from err
    return tuple(configs), from_file, from_cli


def parse_recipe_args(argv: list[str] | None = None, defaults: dict | None = None):
    """(RecipeConfig, ModelArguments, training config) from ``--config file.yaml`` and flags.

    The training config is :class:`~ctrl_offline.training.config.CTRLConfig` (TRL's DPOConfig) for
    ``data_format: pairs``, :class:`~ctrl_offline.training.config.CTRLGroupedConfig` for grouped and
    :class:`~ctrl_offline.training.config.CTRLPointwiseConfig` (SFTConfig) for pointwise, so the recipe is read first; its ``ctrl_loss`` must train that format (:func:`check_loss`).
    ``defaults`` are the script's own defaults (a YAML file and the command line override them).
    An unknown key, in the file or on the command line, is named with the closest known key.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv and argv.index("--config") + 1 >= len(argv):
        raise RecipeError("--config needs a YAML file")
    where = f"in {argv[argv.index('--config') + 1]}" if "--config" in argv else ""
    # The recipe and the loss first (--help waits for the second pass, which knows every key).
    (recipe, _, loss), _, _ = _parse((RecipeConfig, ModelArguments, _Loss),
                                     [a for a in argv if a not in ("-h", "--help")], defaults, where)
    if loss.ctrl_loss is not None:
        check_loss(recipe, loss.ctrl_loss)
    trainer_config = {"pairs": CTRLConfig, "grouped": CTRLGroupedConfig}.get(recipe.data_format, CTRLPointwiseConfig)
    types = (RecipeConfig, ModelArguments, trainer_config)
    configs, from_file, from_cli = _parse(types, argv, defaults, where)
    known = _field_names(types)
    unknown_file = [s[2:] for s in from_file[::2]]
    unknown_cli = [s[2:].split("=")[0] for s in from_cli if s.startswith("--")]
    if unknown_file or unknown_cli or [s for s in from_cli if not s.startswith("--")]:
        message = "\n".join(m for m in (_unknown_key_message(unknown_file, known, where),
                                         _unknown_key_message(unknown_cli, known, "on the command line")) if m)
        raise RecipeError(message or f"unexpected arguments: {from_cli}")
    return configs
