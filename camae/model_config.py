"""Typed model configuration, read from and written to the official OpenPhenom `config.json`.

The official OpenPhenom `MAEModel` hard-codes its architecture and reads only five top-level keys of
`config.json`. camae builds from the config instead (the tiny test checkpoint needs that) with the rule of
spec section 3: encoder from `encoder.max_in_chans` plus the timm overrides next to `global_pool`, decoder from
`decoder.*`, decoder LayerNorm eps always 1e-5 (the official value; the config's 1e-6 is ignored as officially).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from camae.config import ConfigError

BIAS_ROUTINGS = ("legacy", "modern")

# timm constructors the official configs name, with their (embed_dim, depth, num_heads, patch_size)
BACKBONES = {
    "vit_small_patch16_256": (384, 12, 6, 16),
    "vit_small_patch8_256": (384, 12, 6, 8),
    "vit_base_patch16_256": (768, 12, 12, 16),
    "vit_base_patch8_256": (768, 12, 12, 8),
    "vit_large_patch16_256": (1024, 24, 16, 16),
    "vit_large_patch8_256": (1024, 24, 16, 8),
}
BACKBONE_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio", "init_values", "drop_path_rate")
BACKBONE_IGNORED = ("_target_", "global_pool")
DECODER_KEYS = ("_target_", "depth", "embed_dim", "mlp_ratio", "norm_layer", "num_heads", "num_modalities",
                "qkv_bias", "tokens_per_modality")
# The five top-level keys the official model reads, with MAEConfig's defaults when absent.
TOP_LEVEL_DEFAULTS = {"mask_ratio": 0.75, "fourier_loss_weight": 0.0, "mask_fourier_loss": True,
                      "return_channelwise_embeddings": False, "use_MAE_weight_init": False}

# The published checkpoint's config.json (spec section 3): the template for configs camae writes.
HUB_CONFIG = {
    "_attn_implementation_autoset": True,
    "auto_map": {"AutoModel": "huggingface_mae.MAEModel", "AutoConfig": "huggingface_mae.MAEConfig"},
    "apply_loss_unmasked": False,
    "architectures": ["MAEModel"],
    "crop_size": -1,
    "decoder": {"_target_": "mae_modules.CAMAEDecoder", "depth": 8, "embed_dim": 512, "mlp_ratio": 4,
                "norm_layer": {"_partial_": True, "_target_": "torch.nn.LayerNorm", "eps": 1e-06},
                "num_heads": 16, "num_modalities": 6, "qkv_bias": True, "tokens_per_modality": 256},
    "encoder": {"_target_": "mae_modules.MAEEncoder", "channel_agnostic": True, "max_in_chans": 11,
                "vit_backbone": {"_target_": "vit.sincos_positional_encoding_vit",
                                 "vit_backbone": {"_target_": "vit.vit_small_patch16_256", "global_pool": "avg"}}},
    "fourier_loss": {"_target_": "loss.FourierLoss", "num_multimodal_modalities": 6},
    "fourier_loss_weight": 0.0,
    "input_norm": {"_args_": [{"_target_": "normalizer.Normalizer"},
                              {"_target_": "torch.nn.LazyInstanceNorm2d", "affine": False,
                               "track_running_stats": False}],
                   "_target_": "torch.nn.Sequential"},
    "layernorm_unfreeze": True,
    "loss": {"_target_": "torch.nn.MSELoss", "reduction": "none"},
    "lr_scheduler": {"_partial_": True, "_target_": "torch.optim.lr_scheduler.OneCycleLR",
                     "anneal_strategy": "cos", "max_lr": 0.0001, "pct_start": 0.1},
    "mask_fourier_loss": True,
    "mask_ratio": 0.0,
    "model_type": "MAE",
    "norm_pix_loss": False,
    "num_blocks_to_freeze": 0,
    "optimizer": {"_partial_": True, "_target_": "timm.optim.lion.Lion", "betas": [0.9, 0.95], "lr": 0.0001,
                  "weight_decay": 0.05},
    "return_channelwise_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": "4.46.1",
    "trim_encoder_blocks": None,
    "use_MAE_weight_init": False,
}


@dataclass
class EncoderConfig:
    """Channel-agnostic ViT encoder. Defaults are OpenPhenom's ViT-S/16 at 256x256."""

    embed_dim: int = 384
    """Token width D; divisible by num_heads and by 4 (2-D sin-cos table)."""
    depth: int = 12
    """Number of parallel-scaling blocks."""
    num_heads: int = 6
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """MLP hidden width over embed_dim."""
    patch_size: int = 16
    """Square patch side in pixels; one token per patch per channel."""
    img_size: int = 256
    """Square crop side the positions are valid for."""
    max_in_chans: int = 11
    """Channel slots of the position table: the most channels one image may have."""
    init_values: float = 1e-4
    """LayerScale initial gamma (matters only for fresh weights)."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block, linear from 0 over the blocks (train mode only)."""
    bias_routing: str = "legacy"
    """Where `mlp_bias` goes in the fused projection: "legacy" (timm <= 1.0.24, how OpenPhenom was trained and
    exported) or "modern" (timm >= 1.0.25)."""

    def __post_init__(self):
        if self.bias_routing not in BIAS_ROUTINGS:
            raise ConfigError(f"encoder.bias_routing={self.bias_routing!r}; choose one of {BIAS_ROUTINGS}")
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ConfigError(f"encoder.embed_dim={self.embed_dim} must be divisible by num_heads="
                              f"{self.num_heads} and by 4")
        if self.img_size % self.patch_size:
            raise ConfigError(f"encoder.img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass
class DecoderConfig:
    """CA-MAE cross-attention decoder. Defaults are OpenPhenom's (depth 8, width 512, 6 modality slots)."""

    embed_dim: int = 512
    """Token width E."""
    depth: int = 8
    """timm Blocks per modality slot."""
    num_heads: int = 16
    """Heads of the per-slot Blocks."""
    mlp_ratio: float = 4.0
    """MLP hidden width over embed_dim."""
    num_modalities: int = 6
    """Channel slots the decoder reconstructs; the MAE pass needs images with exactly this many channels."""
    tokens_per_modality: int = 256
    """Tokens per slot; must equal (img_size / patch_size)^2."""
    cross_attention_heads: int = 8
    """Heads of the shared cross-attention (hard-coded 8 officially)."""
    norm_eps: float = 1e-5
    """LayerNorm eps of every decoder norm (1e-5 officially, whatever config.json says)."""


@dataclass
class MAEConfig:
    """The whole model. `from_json_dict` / `to_json_dict` convert from and to the official config.json."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """Encoder dimensions."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Decoder dimensions."""
    mask_ratio: float = 0.75
    """Fraction of tokens the MAE pass masks (the published config.json has 0.0)."""
    fourier_loss_weight: float = 0.0
    """Weight w of the Fourier term: loss = (1-w)*mse + w*fourier."""
    mask_fourier_loss: bool = True
    """Average the Fourier term over masked tokens only."""
    return_channelwise_embeddings: bool = False
    """`predict` returns [B, D*C] (one embedding per channel) instead of [B, D]."""
    use_MAE_weight_init: bool = False
    """Fresh weights with MAE's xavier init instead of timm's truncated normal."""
    raw: dict = field(default_factory=lambda: copy.deepcopy(HUB_CONFIG), repr=False)
    """The config.json this came from; keys camae does not use are written back unchanged."""

    def __post_init__(self):
        if self.decoder.tokens_per_modality != self.encoder.grid_size**2:
            raise ConfigError(f"decoder.tokens_per_modality={self.decoder.tokens_per_modality} must equal "
                              f"(img_size/patch_size)^2 = {self.encoder.grid_size**2}")

    @classmethod
    def from_json_dict(cls, d: dict, bias_routing: str | None = None) -> MAEConfig:
        """Parse an official config.json dict; an unusable or unknown architecture key raises ConfigError."""
        enc = _section(d, "encoder")
        if enc.get("channel_agnostic", True) is not True:
            raise ConfigError("encoder.channel_agnostic is false: camae supports channel-agnostic checkpoints only")
        backbone = _section(_section(enc, "vit_backbone", "encoder."), "vit_backbone", "encoder.vit_backbone.")
        encoder = EncoderConfig(**_backbone_kwargs(backbone), max_in_chans=int(enc.get("max_in_chans", 11)),
                                bias_routing=bias_routing or d.get("camae", {}).get("bias_routing", "legacy"))
        decoder = DecoderConfig(**_decoder_kwargs(_section(d, "decoder")))
        top = {k: d.get(k, default) for k, default in TOP_LEVEL_DEFAULTS.items()}
        return cls(encoder=encoder, decoder=decoder, raw=copy.deepcopy(d), **top)

    def to_json_dict(self) -> dict:
        """The config.json to write: the source dict with every architecture and top-level value set from
        this config, so both camae and the official loader read it."""
        d = copy.deepcopy(self.raw)
        enc = d.setdefault("encoder", copy.deepcopy(HUB_CONFIG["encoder"]))
        enc["max_in_chans"] = self.encoder.max_in_chans
        outer = enc.setdefault("vit_backbone", copy.deepcopy(HUB_CONFIG["encoder"]["vit_backbone"]))
        outer["vit_backbone"] = _backbone_json(self.encoder, outer.get("vit_backbone", {}))
        dec = d.setdefault("decoder", copy.deepcopy(HUB_CONFIG["decoder"]))
        for k in ("depth", "embed_dim", "num_heads", "num_modalities", "tokens_per_modality"):
            dec[k] = getattr(self.decoder, k)
        dec["mlp_ratio"] = _plain_number(self.decoder.mlp_ratio)
        for k in TOP_LEVEL_DEFAULTS:
            d[k] = getattr(self, k)
        d["camae"] = {"bias_routing": self.encoder.bias_routing}
        return d


def _section(d: dict, key: str, where: str = "") -> dict:
    if not isinstance(d.get(key), dict):
        raise ConfigError(f"config.json has no '{where}{key}' section; is this an OpenPhenom config.json?")
    return d[key]


def _backbone_kwargs(backbone: dict) -> dict:
    name = str(backbone.get("_target_", "vit.vit_small_patch16_256")).rsplit(".", 1)[-1]
    if name not in BACKBONES:
        raise ConfigError(f"encoder.vit_backbone.vit_backbone._target_ names {name!r}; camae knows {list(BACKBONES)}")
    unknown = set(backbone) - set(BACKBONE_OVERRIDES) - set(BACKBONE_IGNORED)
    if unknown:
        raise ConfigError(f"encoder.vit_backbone.vit_backbone has keys camae cannot apply: {sorted(unknown)}; "
                          f"supported overrides are {list(BACKBONE_OVERRIDES)}")
    embed_dim, depth, num_heads, patch = BACKBONES[name]
    kwargs = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "patch_size": patch}
    return kwargs | {k: backbone[k] for k in BACKBONE_OVERRIDES if k in backbone}


def _backbone_json(cfg: EncoderConfig, previous: dict) -> dict:
    """timm constructor name + only the overrides that differ from its defaults (so the full model writes none)."""
    candidates = [n for n, v in BACKBONES.items() if v[3] == cfg.patch_size]
    if not candidates:
        raise ConfigError(f"encoder.patch_size={cfg.patch_size} has no OpenPhenom backbone; use 8 or 16")
    name = next((n for n in candidates if BACKBONES[n][0] == cfg.embed_dim), candidates[0])
    base = dict(zip(("embed_dim", "depth", "num_heads"), BACKBONES[name][:3], strict=True))
    base |= {"mlp_ratio": 4.0, "init_values": 1e-4, "drop_path_rate": 0.1}
    out = {"_target_": f"vit.{name}", "global_pool": previous.get("global_pool", "avg")}
    return out | {k: _plain_number(getattr(cfg, k)) for k in BACKBONE_OVERRIDES if getattr(cfg, k) != base[k]}


def _decoder_kwargs(dec: dict) -> dict:
    unknown = set(dec) - set(DECODER_KEYS)
    if unknown:
        raise ConfigError(f"decoder has keys camae does not know: {sorted(unknown)}; expected {list(DECODER_KEYS)}")
    if dec.get("qkv_bias", True) is not True:
        raise ConfigError("decoder.qkv_bias is false; OpenPhenom's decoder blocks have qkv bias")
    return {k: dec[k] for k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "num_modalities",
                                "tokens_per_modality") if k in dec}


def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x
