"""Behaviour beyond the golden values: input checks, pooling, LoRA, precision, training, missing stains."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from camae import MAEModel
from camae.model import normalize_images, patchify, unpatchify


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda: torch.zeros(4, 256, 256, dtype=torch.uint8), ValueError, r"\[B, C, H, W\], got 3 dims"),
    (lambda: torch.zeros(1, 4, 256, 256, dtype=torch.int16), TypeError, "map 16-bit images to 8-bit"),
    (lambda: torch.zeros(1, 4, 256, 256, dtype=torch.bool), TypeError, "expected uint8"),
    (lambda: torch.zeros(1, 12, 256, 256, dtype=torch.uint8), ValueError, "got 12 channels; .* 1 to 11"),
    (lambda: torch.zeros(1, 0, 256, 256, dtype=torch.uint8), ValueError, "got 0 channels"),
    (lambda: torch.zeros(1, 4, 128, 128, dtype=torch.uint8), ValueError, r"\(128, 128\) pixels.*crop or tile"),
    (lambda: torch.zeros(1, 4, 250, 256, dtype=torch.uint8), ValueError, r"\(250, 256\) pixels"),
    (lambda: [[0]], TypeError, "expected a torch.Tensor"),
])
def test_predict_rejects_bad_inputs(tiny_model, make, error, message):
    with pytest.raises(error, match=message):
        tiny_model.predict(make())


def test_float_pixels_on_the_255_scale_equal_uint8(tiny_model, images):
    x = images(c=3)
    assert_close(tiny_model.predict(x.float()), tiny_model.predict(x))


def test_normalizer_equals_the_official_modules():
    """Official input_norm: Normalizer (x.float()/255) then InstanceNorm2d(affine=False, no running stats)."""
    x = torch.randint(0, 256, (3, 4, 256, 256), dtype=torch.uint8)
    x[:, 1] = 7  # constant channel: ~0 (float32 mean rounding leaves < 1e-6)
    x[:, 2] = x[:, 2] % 3  # values in {0, 1, 2}: the eps on the /255 scale shrinks it
    official = torch.nn.InstanceNorm2d(4, affine=False, track_running_stats=False)(x.float() / 255)
    out = normalize_images(x)
    assert torch.equal(out, official)
    assert out[:, 1].abs().max() < 1e-6 and out[:, 2].std() < 0.95


def test_pools_agree(tiny_model, images):
    with torch.no_grad():
        tokens = tiny_model.forward_features(images(c=4))
    avg = tiny_model.forward_head(tokens)
    channelwise = tiny_model.forward_head(tokens, pool="channelwise")
    assert channelwise.shape == (2, 4 * 32)
    assert_close(channelwise.reshape(2, 4, 32).mean(1), avg)  # equal tokens per channel
    assert torch.equal(tiny_model.forward_head(tokens, pool="cls"), tokens[:, 0])
    with pytest.raises(ValueError, match="unknown pool 'max'"):
        tiny_model.forward_head(tokens, pool="max")


def test_patchify_round_trip():
    x = torch.randn(2, 6, 256, 256)
    tokens = patchify(x, 16)
    assert tokens.shape == (2, 1536, 256)
    assert torch.equal(tokens[0, 16 * 3 + 5], x[0, 0, 48:64, 80:96].reshape(-1))  # token c*256 + r*16 + col
    assert torch.equal(unpatchify(tokens, 16, 6), x)


def test_lora_on_in_proj_changes_the_output_and_merges_exactly(tiny_model, images):
    from peft import LoraConfig, get_peft_model

    x, before = images(c=4), tiny_model.predict(images(c=4))
    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "in_proj" in n for n in trainable)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # peft starts B at zero; give the adapter an effect
    adapted = tiny_model.predict(x)
    assert (adapted - before).abs().max() > 1e-2
    merged = peft_model.merge_and_unload()
    assert_close(merged.predict(x), adapted, atol=1e-4, rtol=1e-4)


def test_mae_training_step_backpropagates(tiny_model, images):
    tiny_model.train()
    tiny_model.mask_ratio = 0.75
    tiny_model.config.fourier_loss_weight = 0.01
    loss, recon, mask = tiny_model.forward_loss(images(c=6))
    loss.backward()
    assert torch.isfinite(loss) and mask.sum() == 2 * 1152
    grads = {n: p.grad for n, p in tiny_model.named_parameters() if p.requires_grad and "fc_norm" not in n}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert tiny_model.encoder.vit_backbone.pos_embed.grad is None  # fixed table
    assert tiny_model.encoder.vit_backbone.fc_norm.weight.grad is None  # only forward_head uses it


def test_loss_without_masking_is_a_clear_error(tiny_model, images):
    tiny_model.mask_ratio = 0.0  # the published config's value
    with pytest.raises(ValueError, match="masks no token"):
        tiny_model.forward_loss(images(c=6))


def test_mae_needs_the_decoder_channel_count(tiny_model, images):
    with pytest.raises(ValueError, match="exactly 6 channel slots; got 4"):
        tiny_model(images(c=4))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, images):
    x = images(b=1, c=2)
    grads = []
    for enable in (False, True):
        tiny_model.zero_grad()
        tiny_model.set_grad_checkpointing(enable)
        tiny_model.forward_head(tiny_model.forward_features(x)).sum().backward()
        grads.append(tiny_model.encoder.vit_backbone.blocks[0].in_proj.weight.grad.clone())
    assert_close(grads[0], grads[1])


def test_drop_path_is_active_only_in_train_mode(tiny_dir, images):
    model = MAEModel.from_pretrained(tiny_dir)
    x = images(b=4, c=2)
    assert torch.equal(model.predict(x), model.predict(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model.predict(x), model.predict(x))


def test_bf16_autocast(tiny_model, golden):
    x = golden["input.C4"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_model.predict(x)
    assert_close(out.float(), golden["predict.pooled.C4"], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(tiny_dir, golden, dtype):
    """The official normalizer returns float32 and breaks a half model; ours casts after normalizing."""
    model = MAEModel.from_pretrained(tiny_dir).to(dtype)
    out = model.predict(golden["input.C4"])
    assert out.dtype == dtype
    assert_close(out.float(), golden["predict.pooled.C4"], atol=0.1, rtol=0.05)


def test_predict_missing_channels(tiny_model, images):
    x = images(c=6)
    out = tiny_model.predict_missing_channels(x, missing=[4, 2])
    assert out.shape == (2, 2, 256, 256) and out.dtype == torch.float32
    # the content of a missing channel is ignored
    y = x.clone()
    y[:, [2, 4]] = 0
    assert_close(tiny_model.predict_missing_channels(y, missing=[2, 4]), out)
    # equal to the plain MAE pass given noise that removes exactly those channels' tokens
    noise = torch.arange(1536.0).repeat(2, 1)
    noise[:, 512:768] += 1536
    noise[:, 1024:1280] += 1536
    tiny_model.mask_ratio = 2 / 6
    with torch.no_grad():
        _, recon, mask = tiny_model(x, constant_noise=noise)
    assert mask[:, 512:768].all() and not mask[:, :512].any()
    assert_close(unpatchify(recon, 16, 6)[:, [2, 4]], out)


@pytest.mark.parametrize("missing", [[], [0, 1, 2, 3, 4, 5], [6], [-1]])
def test_predict_missing_channels_rejects_bad_requests(tiny_model, images, missing):
    with pytest.raises(ValueError, match="missing must name between 1 and 5"):
        tiny_model.predict_missing_channels(images(c=6), missing=missing)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_matches_float32(tiny_dir, golden, dtype):
    model = MAEModel.from_pretrained(tiny_dir, map_location="cuda")
    x = golden["input.C11"].cuda()
    assert_close(model.predict(x).cpu(), golden["predict.pooled.C11"], atol=1e-4, rtol=1e-4)
    with torch.autocast("cuda", dtype=dtype):
        assert_close(model.predict(x).float().cpu(), golden["predict.pooled.C11"], atol=0.1, rtol=0.05)
    assert_close(model.to(dtype).predict(x).float().cpu(), golden["predict.pooled.C11"], atol=0.1, rtol=0.05)
