"""Recipe `prune` (also `finetune`): compress a trained model, then train it further with its masks held.

`train_loop_per_worker` runs on every Ray Train worker, top to bottom:
  setup    data from config; the input model (recipe.input: an MLflow run, a pipeline stage, a directory), loaded
           from safetensors; optional depth pruning (recipe.structured.drop_blocks: the least influential
           transformer blocks removed on calibration batches); optional structured pruning (whole neurons/channels
           removed: a physically smaller model, before DeepSpeed sees it); DeepSpeed engine; the unstructured or
           N:M pruning hook, by magnitude or wanda (one_shot | gradual | hold: `orchestrator.train.compression`)
           or, for Hugging Face LMs, attention heads and MLP units removed (recipe.lm_structured); for wanda,
           input-feature norms measured on recipe.pruning.calibration_batches batches before DeepSpeed
  fit      the train recipe's loop, with the hook: masks enforced after every step and saved in every checkpoint
The exported model is the smaller architecture (its config written into the checkpoint) with its zeros.

ZeRO and precision: unstructured masks hold at ZeRO 0-2 in fp32/bf16 (gradient hooks + master-copy and moment
zeroing, see `orchestrator.compress.mask_enforcer`); ZeRO-3 is refused when the plan is built. Structured pruning
happens on the fp32 model before `deepspeed.initialize`, so any ZeRO stage and precision trains the result.
With recipe.pruning.schedule=none (plain fine-tuning) ZeRO-3 runs; the input model is loaded whole on every rank
(from its safetensors) and partitioned by `deepspeed.initialize`, unlike the train recipe's partitioned construction.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from orchestrator.recipes.train import fit

from orchestrator.artifacts.source import load_model
from orchestrator.compress import prune_structured, pruned_model_config
from orchestrator.compress.depth import drop_blocks
from orchestrator.compress.lm_structured import prune_causal_lm
from orchestrator.compress.wanda import input_feature_norms
from orchestrator.config.trust import trusted_model_targets
from orchestrator.models.hf_causal_lm import hf_model_config
from orchestrator.train.compression import pruning_hook, selected_parameters
from orchestrator.train.construction import enable_activation_checkpointing
from orchestrator.train.data_order import calibration_batches, example_inputs
from orchestrator.train.engine import build_engine
from orchestrator.train.steps import start_worker


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg, trainer, recipe = loop_config["config"], loop_config["config"]["trainer"], loop_config["config"]["recipe"]
    start_worker(loop_config)
    data = instantiate(cfg["data"])
    model, model_cfg = load_model(loop_config["sources"]["input"], trusted_model_targets(cfg))
    model.train()
    structured = recipe["structured"]
    if structured["drop_blocks"] > 0:
        # depth first: widths are then ranked on the shorter model; the same batches on every rank
        batches = calibration_batches(data.train, structured["calibration_batches"], trainer["micro_batch_size"])
        model, model_cfg = drop_blocks(model, model_cfg, structured["drop_blocks"], batches)
    if structured["ratio"] > 0:
        # deterministic on every rank: same weights, same magnitude ranking, same example batch
        example = example_inputs(data.train)
        model = prune_structured(
            model, example, structured["ratio"],
            ignored_layers=structured["ignored_layers"], round_to=structured["round_to"],
        )
        model_cfg = pruned_model_config(model_cfg, model)
    lm_structured = recipe.get("lm_structured") or {}
    if lm_structured.get("heads_ratio", 0) > 0 or lm_structured.get("mlp_ratio", 0) > 0:
        # Hugging Face LMs: heads and MLP units removed by weight magnitude (the same choice on every rank)
        model = prune_causal_lm(model, lm_structured["heads_ratio"], lm_structured["mlp_ratio"])
        model_cfg = hf_model_config(model)
    if trainer["activation_checkpointing"]:
        enable_activation_checkpointing(model)
    pruning, norms = recipe["pruning"], None
    if pruning["method"] == "wanda" and pruning["schedule"] in ("one_shot", "gradual"):
        # on the fp32 model before DeepSpeed: the same first batches and weights on every rank, so the same masks
        batches = calibration_batches(data.train, pruning["calibration_batches"], trainer["micro_batch_size"])
        norms = input_feature_norms(model, selected_parameters(model, pruning), batches)
    engine = build_engine(model, loop_config["deepspeed"], trainer["optimizer"], loop_config["precision_auto"])
    hook = pruning_hook(engine.module, pruning, trainer["max_steps"], engine.optimizer, input_norms=norms)
    hooks = {"sparsity": hook} if hook else {}
    fit(engine, data, loop_config, hooks=hooks, model_spec={"model": model_cfg})
