"""The channel-agnostic masked autoencoder of OpenPhenom (Phenom CA-MAE-S/16), exact against the official model.

Read top to bottom: input normalizer -> channel-agnostic ViT encoder -> CA-MAE decoder -> MAEModel, the one
class users touch (`from_pretrained`, `predict`, `forward_features` / `forward_head`, the MAE loss).
Every number comes from `MAEConfig` (camae/model_config.py), so the tiny test checkpoint and the full 178M-value
model are the same code. The reference for every detail is `shared/reference/openphenom-spec.md`.

Shapes: B batch, C channels of the image, D encoder width, E decoder width, p patch size, g = img_size / p patches
per side, T = g*g tokens per channel, L = C*T body tokens (cls excluded), M = number of decoder modality slots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerScale, Mlp
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from camae.checkpoint import check_state_dict, read_config_json, read_state_dict, write_checkpoint
from camae.model_config import DecoderConfig, EncoderConfig, MAEConfig

# ----------------------------------------------------------------------------------------------------------------
# Fixed pieces: input normalization, patchify, sin-cos positions, masking


def normalize_images(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Official `input_norm`: x/255, then per-image per-channel standardization. [B,C,H,W] -> float32 [B,C,H,W].

    The eps sits on the /255 scale and the variance is the biased one, exactly as `InstanceNorm2d(affine=False)`.
    Always computed in float32, also for a half-precision model (where the official normalizer breaks).
    """
    x = x.float() / 255.0
    return F.instance_norm(x, eps=eps)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*h*w, p*p]; token t = c*h*w + r*w + col, pixel py*p + px (the official order)."""
    B, C, H, W = x.shape
    h, w = H // p, W // p
    x = x.reshape(B, C, h, p, w, p).permute(0, 1, 2, 4, 3, 5)  # [B, C, h, w, p, p]
    return x.reshape(B, C * h * w, p * p)


def unpatchify(tokens: torch.Tensor, p: int, num_channels: int) -> torch.Tensor:
    """Inverse of `patchify` for square images: [B, C*g*g, p*p] -> [B, C, g*p, g*p]."""
    B, L, _ = tokens.shape
    g = math.isqrt(L // num_channels)
    x = tokens.reshape(B, num_channels, g, g, p, p).permute(0, 1, 2, 4, 3, 5)  # [B, C, g, p, g, p]
    return x.reshape(B, num_channels, g * p, g * p)


def sincos_pos_table(dim: int, grid: int, repeats: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table [1, 1 + repeats*grid*grid, dim]: a zero cls row, then one grid block per slot.

    Row for patch (r, col): [sin(r*w), cos(r*w), sin(col*w), cos(col*w)], w_j = 10000^(-j/q), q = dim // 4, all in
    float32, bit-identical to the tables stored in the official checkpoint.
    """
    if dim % 4:
        raise ValueError(f"embedding width {dim} must be divisible by 4 for the 2-D sin-cos position table")
    q = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(q, dtype=torch.float32) / q))  # [q]
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    out_r = torch.einsum("m,d->md", rows.flatten(), omega)  # [g*g, q]
    out_c = torch.einsum("m,d->md", cols.flatten(), omega)
    table = torch.cat([out_r.sin(), out_r.cos(), out_c.sin(), out_c.cos()], dim=1)  # [g*g, dim]
    table = table.repeat(repeats, 1)  # [repeats*g*g, dim]
    return torch.cat([torch.zeros(1, dim), table])[None]


def mask_tokens(tokens: torch.Tensor, noise: torch.Tensor, len_keep: int):
    """Official random masking. tokens [B, L, D], noise [B, L] -> kept [B, len_keep, D], mask [B, L], restore [B, L].

    Tokens with the lowest noise are kept, in increasing-noise order; mask is 1 where a token was removed.
    """
    B, L, D = tokens.shape
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    keep = shuffle[:, :len_keep]
    kept = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, D))
    mask = torch.ones(B, L, device=tokens.device)
    mask[:, :len_keep] = 0
    return kept, torch.gather(mask, 1, restore), restore


def pool_tokens(tokens: torch.Tensor, pool: str, tokens_per_channel: int) -> torch.Tensor:
    """Encoder tokens [B, 1 + C*T, D] -> "avg": mean of patch tokens, cls excluded (as `predict`) [B, D];
    "channelwise": mean per channel, concatenated channel-major [B, C*D]; "cls": the cls token [B, D]."""
    body = tokens[:, 1:]
    if pool == "avg":
        return body.mean(dim=1)
    if pool == "cls":
        return tokens[:, 0]
    if pool == "channelwise":
        return body.reshape(body.shape[0], -1, tokens_per_channel, body.shape[-1]).mean(dim=2).flatten(1)
    raise ValueError(f"unknown pool {pool!r}; choose 'avg', 'channelwise' or 'cls'")


# ----------------------------------------------------------------------------------------------------------------
# Encoder: channel-agnostic ViT with parallel-scaling blocks


class ChannelAgnosticPatchEmbed(nn.Module):
    """One Conv2d(1 -> D) shared by every channel: [B, C, H, W] -> [B, C*T, D], channel-major tokens."""

    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.to(self.proj.weight.dtype).reshape(B * C, 1, H, W)
        x = self.proj(x)  # [B*C, D, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B*C, T, D]
        return x.reshape(B, C * x.shape[1], x.shape[2])


class FusedProjection(nn.Linear):
    """`in_proj`: an nn.Linear without a bias of its own, whose bias is passed in at call time. It keeps the bias
    inside the matmul (what legacy timm did for speed) while staying a module that LoRA can wrap: peft's LoRA
    layer hands extra call arguments through to the layer it wraps."""

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)


class ParallelScalingBlock(nn.Module):
    """timm's ParallelScalingBlock (ViT-22B style) with the trained bias routing, whatever timm is installed.

    One fused `in_proj` (no bias) gives z = [mlp hidden h | q D | k D | v D]. timm <= 1.0.24 (the numerics
    OpenPhenom was trained and exported with) passed `cat(zeros(3D), mlp_bias)` as the bias of that projection,
    so the single bias vector `mlp_bias` [h] lands on z[..., 3D:]: the last D hidden units and q, k, v (before
    the q/k norms). timm >= 1.0.25 adds it to the hidden units only, `cat(mlp_bias, zeros(3D))` ("modern").
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, init_values: float | None, bias_routing: str):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.legacy_bias = bias_routing == "legacy"
        self.mlp_bias = nn.Parameter(torch.zeros(self.mlp_hidden))
        self.in_norm = nn.LayerNorm(dim, eps=1e-6)
        self.in_proj = FusedProjection(dim, self.mlp_hidden + 3 * dim, bias=False)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.attn_out_proj = nn.Linear(dim, dim)
        self.mlp_out_proj = nn.Linear(self.mlp_hidden, dim)
        self.ls = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = nn.Identity()  # stochastic depth: set per block by ChannelAgnosticViT.set_drop_path

    def fused_bias(self) -> torch.Tensor:
        """The bias of `in_proj`'s output [h + 3D], per the configured routing."""
        zeros = self.mlp_bias.new_zeros(self.in_proj.out_features - self.mlp_hidden)
        return torch.cat([zeros, self.mlp_bias] if self.legacy_bias else [self.mlp_bias, zeros])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        z = self.in_proj(self.in_norm(x), self.fused_bias())  # [B, N, h + 3D]
        u, q, k, v = torch.split(z, [self.mlp_hidden, D, D, D], dim=-1)
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)  # [B, H, N, hd]
        k = self.k_norm(k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        y = self.attn_out_proj(a) + self.mlp_out_proj(F.gelu(u))
        return x + self.drop_path(self.ls(y))


class ChannelAgnosticViT(nn.Module):
    """The encoder (`encoder.vit_backbone.*`): shared patch embed, cls token, fixed sin-cos positions repeated per
    channel slot and sliced to the input, parallel-scaling blocks, no final norm; `fc_norm` only in `forward_head`.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tokens_per_channel = cfg.grid_size**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        table = sincos_pos_table(cfg.embed_dim, cfg.grid_size, cfg.max_in_chans)
        self.pos_embed = nn.Parameter(table, requires_grad=False)  # [1, 1 + max_in_chans*T, D]
        self.patch_embed = ChannelAgnosticPatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.blocks = nn.ModuleList(
            ParallelScalingBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.init_values, cfg.bias_routing)
            for _ in range(cfg.depth))
        self.set_drop_path(cfg.drop_path_rate)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.grad_checkpointing = False

    def embed(self, xn: torch.Tensor) -> torch.Tensor:
        """Normalized images [B, C, H, W] -> body tokens with positions [B, C*T, D] (cls not yet prepended)."""
        tokens = self.patch_embed(xn)
        return tokens + self.pos_embed[:, 1:1 + tokens.shape[1]].to(tokens.dtype)

    def with_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend the cls token (its position row is zero): [B, N, D] -> [B, 1+N, D]."""
        return torch.cat([self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)

    def run_blocks(self, x: torch.Tensor, collect: bool = False):
        """The transformer blocks; with `collect`, also every block's output (for per-block probes)."""
        outputs = []
        for block in self.blocks:
            use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
            if collect:
                outputs.append(x)
        return (x, outputs) if collect else x

    def forward_features(self, xn: torch.Tensor) -> torch.Tensor:
        """Normalized images [B, C, H, W] -> tokens [B, 1 + C*T, D] (no final norm, as official)."""
        return self.run_blocks(self.with_cls(self.embed(xn)))

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth for (fine-)tuning: `rate` at the last block, linear from 0 over the blocks."""
        for i, block in enumerate(self.blocks):
            r = rate * i / max(len(self.blocks) - 1, 1)
            block.drop_path = DropPath(r) if r > 0 else nn.Identity()


# ----------------------------------------------------------------------------------------------------------------
# Decoder: channel-agnostic cross-attention decoder (CAMAEDecoder)


class CrossAttention(nn.Module):
    """Queries [B, N, E] attend over context [B, M, E]; no residual; q/kv without bias, proj with bias."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, E = x.shape
        H = self.num_heads
        q = self.q(x).reshape(B, N, H, E // H).transpose(1, 2)  # [B, H, N, hd]
        k, v = self.kv(context).reshape(B, -1, 2, H, E // H).permute(2, 0, 3, 1, 4)  # 2 x [B, H, M, hd]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, E))


class CAMAEDecoder(nn.Module):
    """Adds positions and a learned token per modality slot; every slot's tokens cross-attend over all tokens
    through a shared cross-attention + MLP, then run through that slot's own stack of timm `Block`s."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        E, M = cfg.embed_dim, cfg.num_modalities
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, 1, E))
        self.placeholder = nn.Parameter(torch.zeros(1, 1, E), requires_grad=False)
        grid = math.isqrt(cfg.tokens_per_modality)
        self.pos_embeddings = nn.Parameter(sincos_pos_table(E, grid, M), requires_grad=False)  # [1, 1+M*T, E]
        self.modality_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, 1, E)) for _ in range(M))
        self.cross_attention = CrossAttention(E, cfg.cross_attention_heads)
        self.mlp = Mlp(E, int(E * cfg.mlp_ratio))
        norm = functools.partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.decoders = nn.ModuleList(
            nn.Sequential(*(Block(E, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True, norm_layer=norm)
                            for _ in range(cfg.depth)))
            for _ in range(M))
        self.context_norm, self.query_norm, self.out_norm = norm(E), norm(E), norm(E)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, 1 + M*T, E] (cls first, positional order) -> [B, 1 + M*T, E]."""
        T = self.cfg.tokens_per_modality
        slots = torch.cat([self.placeholder] + [tok.expand(-1, T, -1) for tok in self.modality_tokens], dim=1)
        z = z + (self.pos_embeddings + slots).to(z.dtype)
        body = z[:, 1:]
        # cross-attention and MLP are shared by all slots and act per query, so all slots go through at once
        x = self.cross_attention(self.query_norm(body), self.context_norm(body))  # [B, M*T, E]
        x = x + self.mlp(self.out_norm(x))
        outs = [dec(x[:, m * T:(m + 1) * T]) for m, dec in enumerate(self.decoders)]
        return torch.cat([z[:, :1], *outs], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Losses


def mae_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, fourier_weight: float = 0.0,
             mask_fourier: bool = True) -> torch.Tensor:
    """MSE over masked tokens, optionally mixed with the Fourier term: (1-w)*mse + w*fourier.

    recon, target [B, L, p*p] (self-standardized units), mask [B, L] with 1 = masked. Computed in float32.
    The Fourier term is the L1 distance of |FFT2| of each token's p x p patch: what the official `FourierLoss`
    intends (it raises AttributeError on these inputs) and what the golden values were computed with.
    """
    recon, target, mask = recon.float(), target.float(), mask.float()
    mse = ((recon - target) ** 2).mean(dim=-1)  # [B, L]
    loss = (mse * mask).sum() / mask.sum()
    if fourier_weight > 0:
        p = math.isqrt(recon.shape[-1])
        spectrum = lambda t: torch.fft.fft2(t.reshape(*t.shape[:2], p, p)).abs()  # noqa: E731
        per_token = (spectrum(recon) - spectrum(target)).abs().mean(dim=(-2, -1))  # [B, L]
        fourier = (per_token * mask).sum() / mask.sum() if mask_fourier else per_token.mean()
        loss = (1 - fourier_weight) * loss + fourier_weight * fourier
    return loss


# ----------------------------------------------------------------------------------------------------------------
# The model


class MAEModel(nn.Module):
    """OpenPhenom's MAEModel: official state-dict keys, official outputs, the model card's API.

    `predict(x)` embeds uint8 images; `forward(x)` is the MAE pass (latent, reconstruction, mask);
    `forward_features` / `forward_head` follow timm's feature protocol for probes, fine-tuning heads and LoRA.
    """

    def __init__(self, config: MAEConfig):
        super().__init__()
        self.config = config
        self.encoder = nn.Module()
        self.encoder.vit_backbone = ChannelAgnosticViT(config.encoder)
        self.decoder = CAMAEDecoder(config.decoder)
        self.encoder_decoder_proj = nn.Linear(config.encoder.embed_dim, config.decoder.embed_dim)
        self.decoder_pred = nn.Linear(config.decoder.embed_dim, config.encoder.patch_size**2)
        self.mask_ratio = config.mask_ratio
        self.return_channelwise_embeddings = config.return_channelwise_embeddings
        self._init_weights()

    # --- construction and checkpoints ---------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: MAEConfig | dict | str | os.PathLike, device=None) -> MAEModel:
        """Build the model for a config (MAEConfig, config.json dict or path) with fresh weights, in train mode.

        `device="meta"` builds it without allocating any memory (to inspect keys and shapes).
        """
        if not isinstance(config, MAEConfig):
            config = MAEConfig.from_json_dict(read_config_json(config) if not isinstance(config, dict) else config)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return cls(config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, bias_routing: str | None = None,
                        map_location="cpu") -> MAEModel:
        """Load an official OpenPhenom directory (`config.json` + `model.safetensors`) or one of our exports.

        Accepts both containers found in the wild (the official torch zip holding {"state_dict": ...} and genuine
        safetensors), never runs pickled code, checks every key and shape, and returns the model in eval mode.
        `bias_routing="modern"` reproduces the official code run under timm >= 1.0.25 instead of the trained model.
        """
        config_dict, weights_path = read_config_json(path), os.path.join(path, "model.safetensors")
        config = MAEConfig.from_json_dict(config_dict, bias_routing=bias_routing)
        with torch.device("meta"):
            model = cls(config)
        state_dict = read_state_dict(weights_path, map_location=map_location)
        check_state_dict(state_dict, model.state_dict(), weights_path)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, container: str = "torch") -> None:
        """Write `config.json` + `model.safetensors` with official key names, readable by us and the official
        loader. container="torch" is the official (torch zip) format, "safetensors" a genuine safetensors file."""
        config = dataclasses.replace(self.config, mask_ratio=self.mask_ratio,  # attributes users set, as officially
                                     return_channelwise_embeddings=self.return_channelwise_embeddings)
        write_checkpoint(path, self.state_dict(), config.to_json_dict(), container)

    def _init_weights(self) -> None:
        """Fresh weights as the official construction draws them (timm ViT init, or MAE's xavier init)."""
        std = 0.02
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if self.config.use_MAE_weight_init:
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        vit = self.encoder.vit_backbone
        nn.init.normal_(vit.cls_token, std=1e-6)
        for p in [self.decoder.mask_token, *self.decoder.modality_tokens]:
            nn.init.normal_(p, std=std)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder blocks in backward to save activation memory (timm's method name)."""
        self.encoder.vit_backbone.grad_checkpointing = enable

    @property
    def device(self) -> torch.device:
        return self.decoder_pred.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder_pred.weight.dtype

    @property
    def embed_dim(self) -> int:
        return self.config.encoder.embed_dim

    # --- embeddings: timm's feature protocol and the model card's predict -----------------------------------------

    def check_images(self, x: torch.Tensor) -> None:
        """Raise a clear error for inputs the encoder cannot embed correctly."""
        enc = self.config.encoder
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor of images [B, C, H, W], got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"expected images of shape [B, C, H, W], got {x.dim()} dims {tuple(x.shape)}; "
                             "add a batch dimension with x[None] for a single image")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise TypeError(f"expected uint8 pixels (or floats on the 0..255 scale), got {x.dtype}; map 16-bit "
                            "images to 8-bit first (camae.data does this with per-channel percentile clipping)")
        if not 1 <= x.shape[1] <= enc.max_in_chans:
            raise ValueError(f"got {x.shape[1]} channels; this model takes 1 to {enc.max_in_chans} "
                             "(its position table has that many channel slots)")
        if tuple(x.shape[2:]) != (enc.img_size, enc.img_size):
            raise ValueError(f"got {tuple(x.shape[2:])} pixels; the model was trained on {enc.img_size}x"
                             f"{enc.img_size} crops and its positions are only valid there: crop or tile first")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The official input normalization, on the model's device: raw pixels -> float32 standardized."""
        return normalize_images(x.to(self.device, non_blocking=True))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw pixels [B, C, H, W] (uint8 or 0..255) -> encoder tokens [B, 1 + C*T, D], cls first, no final norm."""
        self.check_images(x)
        return self.encoder.vit_backbone.forward_features(self.normalize(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw pixels -> every encoder block's output tokens, a list of depth x [B, 1 + C*T, D]."""
        self.check_images(x)
        vit = self.encoder.vit_backbone
        return vit.run_blocks(vit.with_cls(vit.embed(self.normalize(x))), collect=True)[1]

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = True, pool: str = "avg") -> torch.Tensor:
        """Pool encoder tokens [B, 1 + C*T, D] (see `pool_tokens`). `pre_logits=True` returns the pooled tokens as
        they are (`predict`'s embedding); `pre_logits=False` adds `fc_norm`, the official `MAEEncoder.forward`."""
        vit = self.encoder.vit_backbone
        out = pool_tokens(tokens, pool, vit.tokens_per_channel)
        return out if pre_logits else vit.fc_norm(out)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The model card's embedding: uint8 [B, C, H, W] -> [B, D], or [B, D*C] when
        `self.return_channelwise_embeddings` is set. Runs without autograd; call `.eval()` first (from_pretrained
        already returns the model in eval mode)."""
        pool = "channelwise" if self.return_channelwise_embeddings else "avg"
        return self.forward_head(self.forward_features(x), pre_logits=True, pool=pool)

    # --- the masked autoencoder ----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, constant_noise: torch.Tensor | None = None):
        """The official MAE pass: images [B, M, H, W] -> (latent [B, 1+keep, D], reconstruction [B, M*T, p*p]
        in self-standardized units, mask [B, M*T] with 1 = masked). Noise is one `torch.rand(B, L)` draw unless
        `constant_noise` is given, as in the official code."""
        L = self._check_mae_input(x)
        return self._reconstruct(self.normalize(x), int(L * (1 - self.mask_ratio)), constant_noise)

    def _check_mae_input(self, x: torch.Tensor) -> int:
        self.check_images(x)
        M = self.config.decoder.num_modalities
        if x.shape[1] != M:
            raise ValueError(f"the MAE decoder has exactly {M} channel slots; got {x.shape[1]} channels")
        return M * self.config.decoder.tokens_per_modality

    def _reconstruct(self, xn: torch.Tensor, len_keep: int, noise: torch.Tensor | None):
        """Normalized images [B, M, H, W] -> (latent, reconstruction, mask), keeping the len_keep lowest-noise
        tokens."""
        vit = self.encoder.vit_backbone
        body = vit.embed(xn)  # [B, L, D]
        if noise is None:
            noise = torch.rand(body.shape[:2], device=body.device)
        kept, mask, restore = mask_tokens(body, noise.to(body.device), len_keep)
        latent = vit.run_blocks(vit.with_cls(kept))  # [B, 1 + len_keep, D]
        z = self.encoder_decoder_proj(latent)  # [B, 1 + len_keep, E]
        B, L = mask.shape
        fill = self.decoder.mask_token.to(z.dtype).expand(B, L - len_keep, -1)
        body_z = torch.gather(torch.cat([z[:, 1:], fill], dim=1), 1, restore[..., None].expand(-1, -1, z.shape[-1]))
        decoded = self.decoder(torch.cat([z[:, :1], body_z], dim=1))  # [B, 1 + L, E]
        return latent, self.decoder_pred(decoded)[:, 1:], mask

    def forward_loss(self, x: torch.Tensor, constant_noise: torch.Tensor | None = None):
        """MAE training step: images -> (loss, reconstruction, mask), loss per the config's Fourier settings."""
        L = self._check_mae_input(x)
        len_keep = int(L * (1 - self.mask_ratio))
        if len_keep >= L:
            raise ValueError(f"mask_ratio={self.mask_ratio} masks no token, so the MAE loss is undefined (NaN in the "
                             "official code); the published config has 0.0: set mask_ratio to e.g. 0.75 to train")
        xn = self.normalize(x)
        _, recon, mask = self._reconstruct(xn, len_keep, constant_noise)
        target = patchify(xn, self.config.encoder.patch_size)
        loss = mae_loss(recon, target, mask, self.config.fourier_loss_weight, self.config.mask_fourier_loss)
        return loss, recon, mask

    @torch.no_grad()
    def predict_missing_channels(self, x: torch.Tensor, missing: Sequence[int]) -> torch.Tensor:
        """The model card's third use: reconstruct absent stains. x [B, M, H, W] holds all M decoder slots; the
        content of the `missing` channels is ignored (fill them with anything). Their tokens are masked, the rest
        kept, and the decoder's reconstruction is returned as images [B, len(missing), H, W] in self-standardized
        units (zero mean, unit variance per image, like `normalize_images` output)."""
        L = self._check_mae_input(x)
        M, T = self.config.decoder.num_modalities, self.config.decoder.tokens_per_modality
        missing = sorted(set(int(c) for c in missing))
        if not missing or len(missing) == M or not all(0 <= c < M for c in missing):
            raise ValueError(f"missing must name between 1 and {M - 1} distinct channels in 0..{M - 1}, got {missing}")
        noise = torch.arange(L, dtype=torch.float32).repeat(x.shape[0], 1)  # tie-free, kept tokens lowest
        for c in missing:
            noise[:, c * T:(c + 1) * T] += L
        _, recon, _ = self._reconstruct(self.normalize(x), L - len(missing) * T, noise)
        images = unpatchify(recon.float(), self.config.encoder.patch_size, M)
        return images[:, missing]
