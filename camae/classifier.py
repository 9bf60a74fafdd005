"""The fine-tuning model: OpenPhenom's encoder with a linear head, and its export.

`MAEClassifier` holds only the encoder (`encoder.*` = the checkpoint's `encoder.vit_backbone.*`) and `head.*`;
the 155M-value decoder stays out of training. `export` writes the fine-tuned encoder back into a full OpenPhenom
directory (official keys and container, so `MAEModel.from_pretrained` and the official loader read it) plus the
head and label names beside it; `MAEClassifier.load` reads such a directory back.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from camae.model import ChannelAgnosticViT, MAEModel, normalize_images, pool_tokens
from camae.model_config import DecoderConfig, EncoderConfig, MAEConfig

HEAD_FILE, META_FILE = "head.safetensors", "classifier.json"
log = logging.getLogger("camae")


_warned: set = set()


def warn_random(cfg) -> None:
    """Once per process: an encoder without a checkpoint is random (jobs say it before they start)."""
    if not cfg.checkpoint and "random" not in _warned:
        _warned.add("random")
        log.warning("no checkpoint is set: the encoder starts from RANDOM weights. Fine for smoke runs; for real "
                    "work point the config's checkpoint at the downloaded OpenPhenom directory.")


def base_model(cfg, decoder: tuple[int, int, int] | None = None) -> MAEModel:
    """The pretrained model named by `cfg.checkpoint` (an OpenPhenom directory or a camae export), or random
    weights of cfg.embed_dim / depth / num_heads drawn with cfg.seed (the same in every job and process), with a
    loud warning. `cfg`: an EncoderSpec; `decoder`: (width, depth, heads) of a random model's decoder (default:
    OpenPhenom's at its dims, else a small one)."""
    if cfg.checkpoint:
        return MAEModel.from_pretrained(cfg.checkpoint, bias_routing=cfg.bias_routing)
    warn_random(cfg)
    # LayerScale starts at 1, not the pretraining 1e-4: with blocks muted, mean-pooled patch embeddings of
    # per-channel standardized images are nearly the same for every image and nothing can be learned.
    encoder = EncoderConfig(embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, init_values=1.0,
                            bias_routing=cfg.bias_routing or "legacy")
    published = (cfg.embed_dim, cfg.depth, cfg.num_heads) == (384, 12, 6)
    dims = decoder or ((512, 8, 16) if published else (32, 1, 2))  # (width, depth, heads); OpenPhenom's for its dims
    decoder = DecoderConfig(embed_dim=dims[0], depth=dims[1], num_heads=dims[2])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return MAEModel(MAEConfig(encoder=encoder, decoder=decoder))


class MAEClassifier(nn.Module):
    """Encoder + (BatchNorm) + dropout + linear head, with timm's forward_features / forward_head protocol."""

    def __init__(self, encoder: ChannelAgnosticViT, num_classes: int, pool: str = "avg", head_dropout: float = 0.0,
                 head_norm: bool = True):
        super().__init__()
        if pool not in ("avg", "cls"):
            raise ValueError(f"pool={pool!r}; a classifier pools with 'avg' or 'cls'")
        self.encoder = encoder
        self.pool = pool
        # MAE's linear-probe recipe: standardize each embedding dimension over the batch (running stats at eval)
        self.head_norm = nn.BatchNorm1d(encoder.cfg.embed_dim, affine=False, eps=1e-6) if head_norm else nn.Identity()
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(encoder.cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE fine-tuning's head init
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_mae(cls, mae: MAEModel, num_classes: int, pool: str = "avg", head_dropout: float = 0.0,
                 head_norm: bool = True):
        return cls(mae.encoder.vit_backbone, num_classes, pool, head_dropout, head_norm)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels [B, C, H, W] -> tokens [B, 1 + C*T, D]."""
        return self.encoder.forward_features(normalize_images(x))

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = pool_tokens(tokens, self.pool, self.encoder.tokens_per_channel)
        return pooled if pre_logits else self.head(self.head_drop(self.head_norm(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's layer-wise LR decay: stem, one group per block, then norm and head."""
        return {"stem": r"^encoder\.(?:cls_token|pos_embed|patch_embed)",
                "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.fc_norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed"}

    def export(self, base: MAEModel, path: str | os.PathLike, label_names: list[str],
               container: str = "torch") -> Path:
        """Write `base` (the model fine-tuning started from) with this encoder's weights, in the official format,
        plus the head and label names. LoRA must be merged first (peft's `merge_and_unload`)."""
        state = {f"encoder.vit_backbone.{k}": v for k, v in self.encoder.state_dict().items()}
        base.load_state_dict(state, strict=False)
        base.save_pretrained(path, container=container)
        head = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        head |= {f"head_norm.{k}": v for k, v in self.head_norm.state_dict().items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in head.items()}, str(Path(path) / HEAD_FILE))
        meta = {"labels": label_names, "pool": self.pool, "head_norm": isinstance(self.head_norm, nn.BatchNorm1d)}
        (Path(path) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> tuple[MAEClassifier, list[str]]:
        """A classifier exported by `export`, in eval mode, and its label names."""
        meta_file = Path(path) / META_FILE
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} is missing: {path} is not a camae classifier export (an "
                                    "OpenPhenom directory without a head loads with MAEModel.from_pretrained)")
        meta = json.loads(meta_file.read_text())
        mae = MAEModel.from_pretrained(path, map_location=map_location)
        model = cls.from_mae(mae, len(meta["labels"]), meta["pool"], head_norm=meta["head_norm"])
        head = load_file(str(Path(path) / HEAD_FILE), device=str(map_location))
        model.load_state_dict(head | {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}, strict=True)
        return model.eval(), meta["labels"]
