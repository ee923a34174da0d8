"""Settings of ``python -m llama_mtp.server``: llama_cpp.server's own, plus the engine's.

The flags, config-file format and environment variables are llama_cpp.server's
(``ModelSettings``/``ServerSettings``/``ConfigFileSettings`` and its argparse
helpers), so a command line written for ``python -m llama_cpp.server`` works
here unchanged. ``MtpSettings`` adds what the multi-sequence engine needs.
Settings the engine cannot honour are refused up front with one line (exit
code 2) instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings, Settings

# chat formats whose handlers evaluate images on the Llama's context themselves
MULTIMODAL_CHAT_FORMATS = ("llava-1-5", "llava-1-6", "obsidian", "moondream", "nanollava", "llama-3-vision-alpha",
                           "minicpm-v-2.6", "qwen2.5-vl", "mtmd", "gemma4")


class SettingsError(ValueError):
    """A setting the MTP server cannot apply (printed as one line, exit code 2)."""


class MtpSettings(BaseSettings):
    """The multi-sequence engine's settings (flags and config-file keys of their own)."""

    n_parallel: int = Field(default=4, ge=1, description="Sequences decoded together (slots); each gets "
                            "n_ctx // n_parallel of the context.")
    n_draft: Union[Literal["auto"], int] = Field(default="auto", description="Tokens drafted per step: 'auto' "
                                                 "(chosen per step) or a fixed K >= 0 (0 = plain decoding).")
    n_draft_max: int = Field(default=3, ge=1, description="Upper bound of the draft length (and of the recurrent "
                             "rollback the contexts keep).")
    max_waiting: int = Field(default=64, ge=0, description="Requests that may wait for a free slot; beyond that "
                             "the server answers 503.")
    ctx_checkpoints: int = Field(default=32, ge=0, description="Recurrent-state checkpoints kept per slot on "
                                 "hybrid/recurrent models (llama-server's --ctx-checkpoints and its default), taken "
                                 "near each prompt's end and at user-message starts, so a conversation's next turn, "
                                 "or another conversation with the same system prompt, resumes from its prefix; "
                                 "0: none.")
    checkpoint_min_step: int = Field(default=8192, ge=1, description="llama-server's --checkpoint-min-step: a "
                                     "long prompt gets a recurrent-state checkpoint every that many tokens, and a "
                                     "user message closer than that to the previous one none of its own (the first "
                                     "and the last always do).")
    cache_ram_mib: int = Field(default=8192, ge=0, description="Host-memory cache for more conversations than "
                               "slots (llama-server's --cache-ram and its default), in MiB, an upper bound: a slot "
                               "about to take another conversation is saved there (with its latest checkpoints), and a "
                               "prompt that goes on from a saved one gets it back instead of decoding it; 0: off.")
    draft_model_path: Optional[str] = Field(default=None, description="External MTP drafter GGUF for a --model "
                                            "without MTP heads (a gemma4-assistant for its gemma4 target); its "
                                            "context shares the model's KV.")

    @field_validator("n_draft", mode="before")
    @classmethod
    def _parse_n_draft(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() != "auto":
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"n_draft must be 'auto' or an integer >= 0, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"n_draft must be 'auto' or an integer >= 0, got {value}")
        return "auto" if isinstance(value, str) else value


class RaySettings(BaseSettings):
    """Serving on Ray Serve (``llama_mtp.server.ray``, the ``ray`` extra): replicas, each its own model copy.

    Flags (or LLAMA_MTP_-prefixed environment variables: a bare RAY_ADDRESS is Ray's own, set inside
    every Ray worker, and must not switch a plain server to Ray).
    """

    model_config = SettingsConfigDict(env_prefix="LLAMA_MTP_")

    replicas: int = Field(default=0, ge=0, description="Replicas on Ray Serve, each with its own engine and model "
                          "copy, behind one port; 0: one process without Ray.")
    ray_address: Optional[str] = Field(default=None, description="Join this Ray cluster (e.g. 'auto' or "
                                       "'ray://head:10001') instead of starting a local Ray instance; implies Ray "
                                       "Serve (with --replicas 1 unless given).")
    ray_num_gpus: float = Field(default=0.0, ge=0, description="GPUs each replica declares to Ray (its CPU "
                                "share is --n_threads).")
    ray_router: Literal["affinity", "default"] = Field(default="affinity", description="'affinity': a "
                                                        "conversation goes to the replica that holds its prefix "
                                                        "(least loaded when that one is saturated); 'default': "
                                                        "Ray Serve's power-of-two router.")

    @property
    def enabled(self) -> bool:
        return self.replicas > 0 or self.ray_address is not None


class MtpConfigFileSettings(ConfigFileSettings, MtpSettings):
    """llama_cpp.server's config file format; the engine's keys sit next to host/port (Ray's are flags)."""


@dataclass
class ServeConfig:
    """Everything ``main`` needs to build the engine and the app."""

    server: ServerSettings
    model: ModelSettings
    mtp: MtpSettings
    ray: RaySettings = field(default_factory=RaySettings)


# --------------------------------------------------------------------------- refusals

# (field, does this value need something the engine cannot do?, why)
_Rule = Tuple[str, Callable[[Any, ModelSettings], bool], str]

_MODEL_RULES: Sequence[_Rule] = (
    ("vocab_only", lambda v, s: bool(v), "a vocab-only model cannot generate"),
    ("embedding", lambda v, s: bool(v), "embeddings are not served: the contexts are set up for generation"),
    ("logits_all", lambda v, s: bool(v) and "logits_all" in s.model_fields_set,
     "not needed: logprobs come from the engine's per-sequence logits (drop the flag)"),
    ("draft_model", lambda v, s: v is not None,
     "llama_mtp drafts with the model's own MTP head, or with an external MTP drafter GGUF given as "
     "--draft_model_path; use --n_draft / --n_draft_max"),
    ("draft_model_num_pred_tokens", lambda v, s: "draft_model_num_pred_tokens" in s.model_fields_set,
     "llama_mtp drafts with the model's own MTP head; use --n_draft_max"),
    ("cache", lambda v, s: bool(v), "llama-cpp-python's prompt cache saves a single-sequence context state; "
     "the multi-sequence engine has none"),
    ("clip_model_path", lambda v, s: v is not None, "multimodal chat handlers evaluate images on the context "
     "directly, which only the engine's worker thread may touch"),
    ("chat_format", lambda v, s: v in MULTIMODAL_CHAT_FORMATS, "multimodal chat handlers evaluate images on the "
     "context directly, which only the engine's worker thread may touch"),
    ("hf_model_repo_id", lambda v, s: v is not None, "downloads from the Hugging Face Hub are not supported; "
     "pass a local GGUF path as --model"),
    ("hf_pretrained_model_name_or_path", lambda v, s: v is not None,
     "a Hugging Face tokenizer would replace the GGUF vocabulary the engine tokenizes with"),
    ("lora_path", lambda v, s: v is not None, "LoRA adapters are not applied to the MTP draft context"),
    ("lora_base", lambda v, s: v is not None, "LoRA adapters are not applied to the MTP draft context"),
)

_SERVER_RULES: Sequence[Tuple[str, Callable[[Any, ServerSettings], bool], str]] = (
    ("interrupt_requests", lambda v, s: bool(v) and "interrupt_requests" in s.model_fields_set,
     "requests run concurrently in the engine; a new request never interrupts another"),
)


def check_supported(cfg: ServeConfig) -> None:
    """Raise SettingsError naming the first setting the engine cannot honour."""
    for name, bad, why in _MODEL_RULES:
        value = getattr(cfg.model, name)
        if bad(value, cfg.model):
            raise SettingsError(f"--{name} {_show(value)} cannot apply to llama_mtp.server: {why}")
    for name, bad_s, why in _SERVER_RULES:
        value = getattr(cfg.server, name)
        if bad_s(value, cfg.server):
            raise SettingsError(f"--{name} {_show(value)} cannot apply to llama_mtp.server: {why}")
    fmt = cfg.model.chat_format
    if fmt is not None and not fmt.startswith("chat_template.") and fmt != "hf-tokenizer-config":
        # names from the GGUF's templates (chat_template.*) are checked once the model is loaded
        from llama_cpp import llama_chat_format

        try:
            llama_chat_format.get_chat_completion_handler(fmt)
        except llama_chat_format.LlamaChatCompletionHandlerNotFoundException:
            raise SettingsError(f"--chat_format {fmt}: no such chat format") from None
    model_path = cfg.model.model
    if not os.path.isfile(model_path):
        raise SettingsError(f"--model {model_path}: no such file")
    draft_path = cfg.mtp.draft_model_path
    if draft_path is not None and not os.path.isfile(draft_path):
        raise SettingsError(f"--draft_model_path {draft_path}: no such file")
    n_draft = cfg.mtp.n_draft
    if n_draft != "auto" and n_draft > cfg.mtp.n_draft_max:
        # a fixed draft length longer than the rollback the contexts keep would need checkpoints
        # on every step; raising the bound is what the user meant
        cfg.mtp.n_draft_max = int(n_draft)
    if cfg.model.n_ctx and cfg.model.n_ctx // cfg.mtp.n_parallel < 8:
        raise SettingsError(f"--n_ctx {cfg.model.n_ctx} leaves {cfg.model.n_ctx // cfg.mtp.n_parallel} tokens per "
                            f"slot with --n_parallel {cfg.mtp.n_parallel}; each slot gets n_ctx // n_parallel")


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


# --------------------------------------------------------------------------- parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama_mtp.server",
        description="OpenAI-compatible server with MTP speculative decoding (llama_cpp.server's flags, plus the "
                    "engine's). Without --model it serves a generated demo model.")
    add_args_from_model(parser, Settings)
    parser.add_argument("--config_file", type=str, help="Path to a config file to load (llama_cpp.server's format; "
                        "one model; the engine's keys n_parallel, n_draft, n_draft_max, max_waiting, ctx_checkpoints, "
                        "checkpoint_min_step, cache_ram_mib, "
                        "draft_model_path may sit next to host/port; Ray's settings are flags only).")
    for cls in (MtpSettings, RaySettings):
        for name, info in cls.model_fields.items():
            # strings are parsed by the settings classes (n_draft takes 'auto' or an int), not argparse
            parser.add_argument(f"--{name}", dest=name, type=_FLAG_TYPES.get(name, int),
                                help=f"{info.description} (default: {info.default})")
    return parser


_FLAG_TYPES: Dict[str, Callable[[str], Any]] = {"n_draft": str, "draft_model_path": str, "ray_address": str,
                                                  "ray_router": str, "ray_num_gpus": float}


def _load_config_file(path: str) -> MtpConfigFileSettings:
    if not os.path.isfile(path):
        raise SettingsError(f"config file {path} not found")
    with open(path, "rb") as f:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return MtpConfigFileSettings.model_validate_json(json.dumps(yaml.safe_load(f)))
        return MtpConfigFileSettings.model_validate_json(f.read())


def parse_config(argv: Optional[List[str]], demo_model: Callable[[], str]) -> ServeConfig:
    """Flags (and CONFIG_FILE / environment variables, as llama_cpp.server reads them) -> ServeConfig.

    Raises SettingsError (one line for the user) on anything invalid or unsupported.
    """
    args = build_parser().parse_args(argv)
    mtp_cli = {k: v for k, v in vars(args).items() if k in MtpSettings.model_fields and v is not None}
    ray_cli = {k: v for k, v in vars(args).items() if k in RaySettings.model_fields and v is not None}
    try:
        config_file = os.environ.get("CONFIG_FILE", args.config_file)
        if config_file:
            file_cfg = _load_config_file(config_file)
            if len(file_cfg.models) != 1:
                raise SettingsError(f"config file {config_file} lists {len(file_cfg.models)} models; "
                                    "llama_mtp.server serves exactly one")
            # only what the file sets: defaults must not count as explicit settings (see check_supported)
            server = ServerSettings.model_validate(file_cfg.model_dump(include=set(ServerSettings.model_fields),
                                                                       exclude_unset=True))
            model = file_cfg.models[0]
            # flags given on the command line override the file's engine keys
            mtp_values: Dict[str, Any] = {k: getattr(file_cfg, k) for k in file_cfg.model_fields_set
                                          if k in MtpSettings.model_fields}
            mtp = MtpSettings(**{**mtp_values, **mtp_cli})
            ray = RaySettings(**ray_cli)
        else:
            if args.model is None and not os.environ.get("MODEL"):
                args.model = demo_model()
            server = parse_model_from_args(ServerSettings, args)
            model = parse_model_from_args(ModelSettings, args)
            mtp = MtpSettings(**mtp_cli)
            ray = RaySettings(**ray_cli)
    except ValidationError as e:
        raise SettingsError(_one_line(e)) from None
    cfg = ServeConfig(server=server, model=model, mtp=mtp, ray=ray)
    check_supported(cfg)
    return cfg


def _one_line(e: ValidationError) -> str:
    errs = e.errors()
    parts = []
    for err in errs[:3]:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "settings"
        parts.append(f"--{loc}: {err.get('msg')}")
    more = f" (and {len(errs) - 3} more)" if len(errs) > 3 else ""
    return "invalid settings: " + "; ".join(parts) + more


# --------------------------------------------------------------------------- Llama kwargs


def llama_kwargs(model: ModelSettings) -> Dict[str, Any]:
    """The llama_cpp.Llama keyword arguments llama_cpp.server would pass for these settings.

    Mirrors llama_cpp.server.model.LlamaProxy.load_llama_from_model_settings, minus what
    check_supported refuses, so both servers load the model the same way.
    """
    kv_overrides: Optional[Dict[str, Union[bool, int, float, str]]] = None
    if model.kv_overrides is not None:
        kv_overrides = {}
        for kv in model.kv_overrides:
            key, value = kv.split("=", 1)
            if ":" in value:
                value_type, value = value.split(":", 1)
                if value_type == "bool":
                    kv_overrides[key] = value.lower() in ("true", "1")
                elif value_type == "int":
                    kv_overrides[key] = int(value)
                elif value_type == "float":
                    kv_overrides[key] = float(value)
                elif value_type == "str":
                    kv_overrides[key] = value
                else:
                    raise SettingsError(f"--kv_overrides {kv}: unknown value type {value_type}")
    return dict(
        n_gpu_layers=model.n_gpu_layers, split_mode=model.split_mode, main_gpu=model.main_gpu,
        tensor_split=model.tensor_split, use_mmap=model.use_mmap, use_mlock=model.use_mlock,
        kv_overrides=kv_overrides, rpc_servers=model.rpc_servers,
        seed=model.seed, n_ctx=model.n_ctx, n_batch=model.n_batch, n_ubatch=model.n_ubatch,
        n_threads=model.n_threads, n_threads_batch=model.n_threads_batch,
        rope_scaling_type=model.rope_scaling_type, rope_freq_base=model.rope_freq_base,
        rope_freq_scale=model.rope_freq_scale, yarn_ext_factor=model.yarn_ext_factor,
        yarn_attn_factor=model.yarn_attn_factor, yarn_beta_fast=model.yarn_beta_fast,
        yarn_beta_slow=model.yarn_beta_slow, yarn_orig_ctx=model.yarn_orig_ctx, mul_mat_q=model.mul_mat_q,
        offload_kqv=model.offload_kqv, flash_attn=model.flash_attn, last_n_tokens_size=model.last_n_tokens_size,
        numa=model.numa, chat_format=model.chat_format, type_k=model.type_k, type_v=model.type_v,
        verbose=model.verbose,
    )
