"""Share MoC-adapted models: a diffusers-format LoRA + `moc_config.json` + a model card, in one folder or Hub repo.

>>> from diffusers import WanPipeline
>>> from diffusers_moc import load_moc_lora

>>> pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
>>> load_moc_lora(pipe, "user/wan-moc-lora")  # adapter weights and MoC routing in one call

Wan 2.2 A14B has two experts. As diffusers' Wan LoRA loader expects (`load_lora_weights(...,
load_into_transformer_2=True)`), each expert's adapter is its own file with `transformer.` keys:
`pytorch_lora_weights.safetensors` for `transformer` (high noise) and
`pytorch_lora_weights_transformer_2.safetensors` for `transformer_2` (low noise); a folder holds one or both.

HunyuanVideo 1.5's pipelines have no LoRA loader in diffusers; its transformer's own `load_lora_adapter` (diffusers'
`PeftAdapterMixin`) reads the same file (`transformer.`-prefixed keys and the adapter's metadata), so
`load_moc_lora` works on `HunyuanVideo15Pipeline` and `HunyuanVideo15LongVideoPipeline` alike.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .core.apply import apply_moc
from .core.config import CONFIG_NAME, MoCConfig

__all__ = [
    "save_moc_lora",
    "load_moc_lora",
    "push_to_hub",
    "moc_model_card",
    "LORA_WEIGHT_NAME",
    "LORA_WEIGHT_NAME_2",
    "ADAPTER_FILES",
]

#: The file diffusers' `save_lora_weights` writes and `load_lora_weights` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: The adapter of Wan 2.2 A14B's low-noise expert, `transformer_2` (loaded with `load_into_transformer_2=True`).
LORA_WEIGHT_NAME_2 = "pytorch_lora_weights_transformer_2.safetensors"
#: Pipeline component -> the file holding its adapter.
ADAPTER_FILES = {"transformer": LORA_WEIGHT_NAME, "transformer_2": LORA_WEIGHT_NAME_2}
MODEL_CARD_TAGS = ["diffusers-moc", "mixture-of-contexts", "lora", "diffusers", "text-to-video", "template:sd-lora"]


def _pipeline_cls(pipeline_cls: type | None) -> type:
    if pipeline_cls is not None:
        return pipeline_cls
    from diffusers import WanPipeline

    return WanPipeline


def save_moc_lora(
    transformer: torch.nn.Module | None,
    save_directory: str | os.PathLike,
    moc_config: MoCConfig,
    *,
    transformer_2: torch.nn.Module | None = None,
    adapter_name: str = "default",
    base_model: str | None = None,
    repo_id: str | None = None,
    training_info: dict[str, Any] | None = None,
    pipeline_cls: type | None = None,
    lora_layers: dict[str, dict[str, torch.Tensor]] | None = None,
) -> str:
    r"""
    Save the LoRA adapter of a PEFT-adapted transformer (or of Wan 2.2 A14B's experts) as a diffusers LoRA, with its
    MoC settings and a model card.

    The folder holds `pytorch_lora_weights.safetensors` (what `pipe.load_lora_weights` reads, with the adapter's
    rank / alpha / target modules as metadata) for `transformer`, `pytorch_lora_weights_transformer_2.safetensors`
    for `transformer_2` (loaded by `pipe.load_lora_weights(..., weight_name=..., load_into_transformer_2=True)`),
    `moc_config.json` and `README.md`.

    Args:
        transformer (`torch.nn.Module`, *optional*): the transformer with a PEFT adapter (`transformer.add_adapter`);
            on Wan 2.2 A14B the high-noise expert, `None` when only `transformer_2` was adapted.
        save_directory (`str` or `os.PathLike`): output folder (created).
        moc_config (`MoCConfig`): the MoC settings the adapter was trained for (restored by [`load_moc_lora`]).
        transformer_2 (`torch.nn.Module`, *optional*): Wan 2.2 A14B's low-noise expert with its adapter.
        adapter_name (`str`, defaults to `"default"`): which adapter to save.
        base_model (`str`, *optional*): the base pipeline repo id, for the model card.
        repo_id (`str`, *optional*): the repo the folder will be pushed to, for the model card's usage snippet.
        training_info (`dict`, *optional*): training settings listed in the model card.
        pipeline_cls (`type`, *optional*): the diffusers pipeline class whose `save_lora_weights` is used
            (default `WanPipeline`).
        lora_layers (`dict`, *optional*): the adapter weights of each transformer by component name
            (`"transformer"`, `"transformer_2"`), PEFT names as `get_peft_model_state_dict` gives them; for models
            whose parameters are sharded (FSDP), whose adapters must first be gathered. Read off the models when
            omitted.

    Returns:
        `str`: the folder.
    """
    from peft.utils import get_peft_model_state_dict

    if not isinstance(moc_config, MoCConfig):
        raise TypeError(f"moc_config must be a MoCConfig, got {type(moc_config).__name__}")
    adapted = {name: m for name, m in (("transformer", transformer), ("transformer_2", transformer_2)) if m is not None}
    if not adapted:
        raise ValueError("give the adapted transformer (and/or transformer_2)")
    peft_configs = {}
    for name, model in adapted.items():
        peft_configs[name] = getattr(model, "peft_config", {}).get(adapter_name)
        if peft_configs[name] is None:
            raise ValueError(f"the {name} has no LoRA adapter named {adapter_name!r}; add one with add_adapter")
    save_directory = os.fspath(save_directory)
    os.makedirs(save_directory, exist_ok=True)
    for name, model in adapted.items():
        _pipeline_cls(pipeline_cls).save_lora_weights(
            save_directory,
            transformer_lora_layers=(
                lora_layers[name]
                if lora_layers is not None
                else get_peft_model_state_dict(model, adapter_name=adapter_name)
            ),
            # Stores rank, alpha and target modules so that loading rebuilds the same LoRA scale (alpha / rank).
            transformer_lora_adapter_metadata=peft_configs[name].to_dict(),
            weight_name=ADAPTER_FILES[name],
        )
    moc_config.save_pretrained(save_directory)
    peft_config = next(iter(peft_configs.values()))
    lora_info = {"rank": peft_config.r, "alpha": peft_config.lora_alpha, "target_modules": peft_config.target_modules}
    if len(adapted) > 1 or "transformer_2" in adapted:
        lora_info["experts"] = sorted(adapted)
    # HunyuanVideo 1.5 adapters load into diffusers' HunyuanVideo15Pipeline (or ours), Wan ones into WanPipeline.
    hunyuan = type(next(iter(adapted.values()))).__name__.startswith("HunyuanVideo15")
    moc_model_card(
        moc_config,
        base_model=base_model,
        repo_id=repo_id,
        lora=lora_info,
        training_info=training_info,
        pipeline_name="HunyuanVideo15Pipeline" if hunyuan else "WanPipeline",
    ).save(os.path.join(save_directory, "README.md"))
    return save_directory


def moc_model_card(
    moc_config: MoCConfig,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    lora: dict[str, Any] | None = None,
    training_info: dict[str, Any] | None = None,
    pipeline_name: str = "WanPipeline",
):
    r"""
    A `huggingface_hub.ModelCard` for a MoC LoRA: base model, tags, MoC and training settings, and how to load it
    (into diffusers' `pipeline_name`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    def jsonable(v: Any) -> Any:
        return sorted(v) if isinstance(v, set) else v

    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        tags=list(MODEL_CARD_TAGS),
        pipeline_tag="text-to-video",
    )
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        "# Mixture-of-Contexts LoRA" + (f" for {base_model}" if base_model else ""),
        "",
        "A LoRA adapter fine-tuned through Mixture of Contexts (MoC) sparse attention routing "
        "([Cai et al., 2025](https://arxiv.org/abs/2508.21058)) with `diffusers-moc`. "
        "Load the adapter and the routing settings in one call:",
        "",
        "```py",
        f"from diffusers import {pipeline_name}",
        "from diffusers_moc import load_moc_lora",
        "",
        f'pipe = {pipeline_name}.from_pretrained("{base_model or "<base model>"}")',
        f'load_moc_lora(pipe, "{repo_id or "<this repo>"}")',
        "```",
        "",
        "## MoC settings (`moc_config.json`)",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| `{k}` | `{json.dumps(v)}` |" for k, v in moc_config.to_dict().items()],
    ]
    if lora:
        lines += ["", "## LoRA", "", "| setting | value |", "|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(jsonable(v))}` |" for k, v in lora.items()]
    if training_info:
        lines += ["", "## Training settings", "", "```json", json.dumps(training_info, indent=2, default=str), "```"]
    return ModelCard("\n".join(lines) + "\n")


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload MoC LoRA",
    revision: str | None = None,
    delete_stale: bool = True,
) -> str:
    r"""
    Upload a folder written by [`save_moc_lora`] (LoRA weights, `moc_config.json`, `README.md`) to a model repo.

    The repo is created if needed. With `delete_stale` (the default) the repo ends up holding exactly the files of
    `folder`: files of earlier pushes that the folder no longer has are deleted in the same commit (Hub's
    `.gitattributes` is always kept), so a stale weight file can never be loaded with the new config.

    Args:
        folder (`str` or `os.PathLike`): the saved folder.
        repo_id (`str`): `"user/name"` or `"org/name"`.
        private (`bool`, defaults to `False`): create the repo private.
        token (`str`, *optional*): Hub token (default: the logged-in one).
        commit_message (`str`): commit message of the upload.
        revision (`str`, *optional*): branch to upload to.
        delete_stale (`bool`, defaults to `True`): delete the repo's files that `folder` does not have.

    Returns:
        `str`: the URL of the commit.
    """
    from huggingface_hub import HfApi

    folder = os.fspath(folder)
    missing = [name for name in (CONFIG_NAME,) if not os.path.isfile(os.path.join(folder, name))]
    if not any(os.path.isfile(os.path.join(folder, name)) for name in ADAPTER_FILES.values()):
        missing.append(" or ".join(ADAPTER_FILES.values()))
    if missing:
        raise FileNotFoundError(f"{folder} is not a saved MoC LoRA: missing {missing}; write it with save_moc_lora")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not isinstance(repo_id, str) or not repo_id.strip("/"):
            raise HFValidationError("empty")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}") from None
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, repo_type="model", exist_ok=True, token=token)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
        token=token,
        # Matched against the repo's files, minus those uploaded in this commit: what is left over is stale.
        delete_patterns="*" if delete_stale else None,
    )
    return str(getattr(info, "commit_url", info))


def _adapter_files(source: str, subfolder: str | None, hub_kwargs: dict[str, Any]) -> list[str]:
    """Which of the adapter files (`ADAPTER_FILES`) a folder or Hub repo holds."""
    if os.path.isdir(source):
        folder = os.path.join(source, subfolder or "")
        return [name for name in ADAPTER_FILES.values() if os.path.isfile(os.path.join(folder, name))]
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    found = []
    for name in ADAPTER_FILES.values():
        try:
            hf_hub_download(source, name, subfolder=subfolder, **hub_kwargs)  # cached: load_lora_weights reuses it
        except LocalEntryNotFoundError as e:  # not "no such file": the Hub could not be asked
            raise OSError(f"{source}: cannot download {name}: no connection to the Hub and not in the cache") from e
        except EntryNotFoundError:
            continue
        found.append(name)
    return found


def load_moc_lora(
    pipe,
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    load_into_transformer_2: bool = False,
    **kwargs: Any,
):
    r"""
    Load a MoC LoRA onto a pipeline in one call: the adapter weights (`pipe.load_lora_weights`, or on a pipeline
    without LoRA loader such as HunyuanVideo 1.5's, `pipe.transformer.load_lora_adapter` with the `transformer`
    prefix) and the saved `moc_config.json`, applied with [`apply_moc`] to every transformer of the pipeline, as
    training ran them.

    Wan 2.2 A14B follows diffusers' convention: `pytorch_lora_weights.safetensors` goes into `transformer` (the
    high-noise expert) and `pytorch_lora_weights_transformer_2.safetensors` into `transformer_2` (low noise), each
    with `pipe.load_lora_weights(..., load_into_transformer_2=...)`; a folder may hold either or both. An expert
    without adapter weights (a run that trained one expert) keeps its weights and runs MoC too, as it did during that
    training's validation; `get_moc_config(pipe)` names the transformers that run MoC.

    Args:
        pipe (`DiffusionPipeline`): a pipeline with MoC-supported transformers and LoRA support, its own or its
            transformer's (e.g. `WanPipeline`, `LongVideoPipeline`, `HunyuanVideo15Pipeline`,
            `HunyuanVideo15LongVideoPipeline`).
        pretrained_model_name_or_path (`str` or `os.PathLike`): a folder from [`save_moc_lora`] or a Hub repo id.
        adapter_name (`str`, *optional*): adapter name for `load_lora_weights`.
        load_into_transformer_2 (`bool`, defaults to `False`): load `pytorch_lora_weights.safetensors` (or
            `weight_name`) into `transformer_2` instead, as diffusers' `load_lora_weights` does (for a low-noise
            adapter saved under the default name). Refused for a folder that holds both experts' adapters.
        kwargs: Hub options passed to both loads (`revision`, `token`, `cache_dir`, `subfolder`, `weight_name`, ...).

    Returns:
        The pipeline (changed in place).
    """
    source = os.fspath(pretrained_model_name_or_path)
    hub_kwargs = {
        k: kwargs[k] for k in ("revision", "token", "cache_dir", "force_download", "local_files_only") if k in kwargs
    }
    # Read the MoC config first: a folder or repo without it is not a MoC LoRA, and nothing is changed then.
    moc_config = MoCConfig.from_pretrained(source, subfolder=kwargs.get("subfolder"), **hub_kwargs)
    if "weight_name" in kwargs:
        files = [kwargs.pop("weight_name")]
    else:
        files = _adapter_files(source, kwargs.get("subfolder"), hub_kwargs)
        if not files:
            raise FileNotFoundError(f"{source} holds no adapter weights ({' or '.join(ADAPTER_FILES.values())})")
    if load_into_transformer_2 and len(files) > 1:
        raise ValueError(
            f"{source} holds adapters for both experts ({', '.join(files)}): load_into_transformer_2=True would load "
            "both into transformer_2; leave it False and each goes into its own expert"
        )
    targets = {}
    for name in files:
        component = "transformer_2" if name == LORA_WEIGHT_NAME_2 or load_into_transformer_2 else "transformer"
        if getattr(pipe, component, None) is None:
            raise ValueError(
                f"{source}: {name} is an adapter for {component}"
                + (" (Wan 2.2 A14B's low-noise expert)" if component == "transformer_2" else "")
                + f", which this {type(pipe).__name__} does not have"
            )
        if not hasattr(pipe, "load_lora_weights") and not hasattr(getattr(pipe, component), "load_lora_adapter"):
            raise ValueError(f"neither this {type(pipe).__name__} nor its {component} can load a LoRA adapter")
        targets[name] = component
    for name, component in targets.items():  # every target checked before any weights load
        if hasattr(pipe, "load_lora_weights"):
            pipe.load_lora_weights(
                source,
                adapter_name=adapter_name,
                weight_name=name,
                load_into_transformer_2=component == "transformer_2",
                **kwargs,
            )
        else:  # the file's keys carry the `transformer.` prefix diffusers' pipeline loaders use
            getattr(pipe, component).load_lora_adapter(
                source, prefix="transformer", adapter_name=adapter_name, weight_name=name, **kwargs
            )
        # PEFT adds the adapter's modules in training mode: an eval model would run the LoRA's dropout.
        model = getattr(pipe, component)
        model.train(model.training)
    return apply_moc(pipe, moc_config)
