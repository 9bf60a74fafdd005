"""camae's model against golden outputs of the official OpenPhenom code (shared/fixtures/openphenom-tiny).

Tolerances are the fixture README's: atol = rtol = 1e-4 for floats, exact for masks and indices, rtol 1e-5 for
the loss scalars. Measured here: the encoder is bitwise equal, the decoder within 3e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from camae import MAEModel
from camae.model import mae_loss, mask_tokens, normalize_images, patchify, sincos_pos_table

CASES = ["C1", "C4", "C6", "C11", "edge4"]
TOL = {"atol": 1e-4, "rtol": 1e-4}


@pytest.fixture(scope="module", params=["official-torch-zip", "genuine-safetensors"])
def model(request, tiny_dir):
    path = tiny_dir if request.param == "official-torch-zip" else tiny_dir / "alt_genuine_safetensors"
    return MAEModel.from_pretrained(path)


def test_loaded_in_eval_mode_with_frozen_tables(model):
    vit = model.encoder.vit_backbone
    assert not model.training
    assert not vit.pos_embed.requires_grad and not model.decoder.pos_embeddings.requires_grad
    assert not model.decoder.placeholder.requires_grad and vit.cls_token.requires_grad


def test_position_tables_are_regenerated_bit_identically(tiny_dir, model):
    official = torch.load(open(tiny_dir / "model.safetensors", "rb"), weights_only=True)["state_dict"]
    assert torch.equal(sincos_pos_table(32, 16, 11), official["encoder.vit_backbone.pos_embed"])
    assert torch.equal(sincos_pos_table(32, 16, 6), official["decoder.pos_embeddings"])
    assert list(model.state_dict()) == list(official)


def test_input_norm(golden):
    assert_close(normalize_images(golden["input.C1"]), golden["input_norm.C1"], **TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channelwise", [False, True])
def test_predict(model, golden, case, channelwise):
    model.return_channelwise_embeddings = channelwise
    out = model.predict(golden[f"input.{case}"])
    assert_close(out, golden[f"predict.{'channelwise' if channelwise else 'pooled'}.{case}"], **TOL)


@pytest.mark.parametrize("case", CASES)
def test_forward_features_and_encoder_head(model, golden, case):
    with torch.no_grad():
        tokens = model.forward_features(golden[f"input.{case}"])
        assert_close(tokens, golden[f"forward_features.{case}"], **TOL)
        assert_close(model.forward_head(tokens, pre_logits=False), golden[f"encoder_forward.{case}"], **TOL)


def test_block_trace(model, golden):
    vit, x = model.encoder.vit_backbone, golden["input.C1"]
    with torch.no_grad():
        xn = normalize_images(x)
        assert_close(vit.patch_embed(xn), golden["trace.C1.patch_embed"], **TOL)
        assert_close(vit.with_cls(vit.embed(xn)), golden["trace.C1.pos_embed_added"], **TOL)
        blocks = model.forward_intermediates(x)
    assert len(blocks) == 2
    for i, out in enumerate(blocks):
        assert_close(out, golden[f"trace.C1.block{i}"], **TOL)


def test_masking_indices_are_exact(golden):
    tokens = torch.randn(2, 1536, 4)
    kept, mask, restore = mask_tokens(tokens, golden["mae.noise"], 384)
    assert torch.equal(restore, golden["mae.mr075.ind_restore"])
    assert torch.equal(mask, golden["mae.mr075.mask"])
    assert kept.shape == (2, 384, 4)


def _mae(model, golden, ratio):
    captured = {}
    handle = model.decoder.register_forward_hook(lambda m, i, o: captured.update(decoder_tokens=o))
    model.mask_ratio = ratio
    try:
        with torch.no_grad():
            latent, recon, mask = model(golden["input.C6"], constant_noise=golden["mae.noise"])
    finally:
        handle.remove()
        model.mask_ratio = 0.75
    return latent, recon, mask, captured["decoder_tokens"]


def test_mae_forward_ratio_075(model, golden):
    latent, recon, mask, dec = _mae(model, golden, 0.75)
    assert latent.shape == (2, 385, 32)
    assert torch.equal(mask, golden["mae.mr075.mask"])
    assert_close(latent, golden["mae.mr075.latent"], **TOL)
    assert_close(dec, golden["mae.mr075.decoder_tokens"], **TOL)
    assert_close(recon, golden["mae.mr075.reconstruction"], **TOL)


def test_mae_forward_ratio_0(model, golden):
    latent, recon, mask, dec = _mae(model, golden, 0.0)
    assert torch.equal(mask, golden["mae.mr000.mask"])
    assert_close(latent, golden["mae.mr000.latent"], **TOL)
    assert_close(dec, golden["mae.mr000.decoder_tokens"], **TOL)
    assert_close(recon[:1, :256], golden["mae.mr000.reconstruction_sample0_chan0"], **TOL)


def test_mae_forward_seeded_noise(model, golden):
    torch.manual_seed(int(golden["mae.seeded.seed"]))
    with torch.no_grad():
        latent, _, mask = model(golden["input.C6"])
    assert torch.equal(mask, golden["mae.seeded.mask"])
    assert_close(latent, golden["mae.seeded.latent"], **TOL)


@pytest.mark.parametrize(("weight", "key"), [(0.0, "loss_mse"), (1.0, "loss_fourier_masked"),
                                             (0.01, "loss_total_fw001")])
def test_losses(golden, weight, key):
    target = patchify(normalize_images(golden["input.C6"]), 16)
    loss = mae_loss(golden["mae.mr075.reconstruction"], target, golden["mae.mr075.mask"], fourier_weight=weight)
    assert_close(loss, golden[f"mae.mr075.{key}"], rtol=1e-5, atol=0)


def test_forward_loss_uses_the_config_weights(model, golden):
    model.config.fourier_loss_weight = 0.01
    try:
        with torch.no_grad():
            loss, _, _ = model.forward_loss(golden["input.C6"], constant_noise=golden["mae.noise"])
    finally:
        model.config.fourier_loss_weight = 0.0
    assert_close(loss, golden["mae.mr075.loss_total_fw001"], rtol=1e-5, atol=0)


def test_modern_timm_routing_is_available_and_exact(tiny_dir, golden, golden_modern):
    model = MAEModel.from_pretrained(tiny_dir, bias_routing="modern")
    model.mask_ratio = 0.75
    legacy = MAEModel.from_pretrained(tiny_dir)
    for case in CASES:
        x = golden[f"input.{case}"]
        assert_close(model.predict(x), golden_modern[f"predict.pooled.{case}"], **TOL)
        # the routing matters: the two differ by O(1), which is why legacy is the default
        assert (legacy.predict(x) - model.predict(x)).abs().max() > 0.1
    with torch.no_grad():
        latent, recon, mask = model(golden["input.C6"], constant_noise=golden["mae.noise"])
        loss, _, _ = model.forward_loss(golden["input.C6"], constant_noise=golden["mae.noise"])
    assert_close(latent, golden_modern["mae.mr075.latent"], **TOL)
    assert_close(recon, golden_modern["mae.mr075.reconstruction"], **TOL)
    assert_close(loss, golden_modern["mae.mr075.loss_mse"], rtol=1e-5, atol=0)
