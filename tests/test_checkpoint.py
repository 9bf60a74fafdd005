"""Loading, saving and the errors a user can hit with a checkpoint directory."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from camae import MAEConfig, MAEModel
from camae.checkpoint import CheckpointError
from camae.model_config import HUB_CONFIG, ConfigError


def test_full_size_keys_and_shapes_match_the_real_checkpoint_without_allocating(full_reference):
    model = MAEModel.from_config(full_reference["config_json_hub_reconstructed"], device="meta")
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())
    assert {k: list(v.shape) for k, v in state.items()} == full_reference["state_dict"]
    assert list(state) == list(full_reference["state_dict"])  # the official order too
    assert sum(t.numel() for t in state.values()) == full_reference["num_elements"] == 178_045_568


@pytest.mark.parametrize("key", ["config_json_hub_reconstructed",
                                 "config_json_written_by_reference_save_pretrained_transformers_5.24.0"])
def test_published_configs_give_openphenom_dims(full_reference, key):
    cfg = MAEConfig.from_json_dict(full_reference[key])
    assert (cfg.encoder.embed_dim, cfg.encoder.depth, cfg.encoder.num_heads, cfg.encoder.max_in_chans) == (
        384, 12, 6, 11)
    assert (cfg.decoder.embed_dim, cfg.decoder.depth, cfg.decoder.num_heads) == (512, 8, 16)
    assert cfg.decoder.norm_eps == 1e-5  # the official hard-coded value, not the config's 1e-6
    assert cfg.mask_ratio == 0.0 and cfg.encoder.bias_routing == "legacy"


def test_missing_top_level_keys_take_official_defaults():
    d = {k: v for k, v in HUB_CONFIG.items() if k not in ("mask_ratio", "return_channelwise_embeddings")}
    cfg = MAEConfig.from_json_dict(d)
    assert cfg.mask_ratio == 0.75 and cfg.return_channelwise_embeddings is False


@pytest.mark.parametrize("container", ["torch", "safetensors"])
def test_save_load_round_trip_is_exact(tiny_model, tmp_path, images, container):
    tiny_model.save_pretrained(tmp_path, container=container)
    magic = (tmp_path / "model.safetensors").read_bytes()[:4]
    assert (magic == b"PK\x03\x04") == (container == "torch")
    back = MAEModel.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(tiny_model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = images(c=6)
    assert torch.equal(back.predict(x), tiny_model.predict(x))


def test_saved_config_is_the_source_config_plus_our_section(tiny_dir, tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((tiny_dir / "config.json").read_text())
    assert written.pop("camae") == {"bias_routing": "legacy"}
    assert written == original


def test_attributes_set_on_the_model_are_saved(tiny_model, tmp_path):
    tiny_model.mask_ratio, tiny_model.return_channelwise_embeddings = 0.75, True
    tiny_model.save_pretrained(tmp_path)
    back = MAEModel.from_pretrained(tmp_path)
    assert back.mask_ratio == 0.75 and back.return_channelwise_embeddings is True


def test_official_loader_can_read_what_we_write(tmp_path):
    """The official from_pretrained: torch.load(file)["state_dict"] + strict load, five top-level config keys."""
    torch.manual_seed(0)
    MAEModel.from_config(HUB_CONFIG).save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)["state_dict"]
    assert len(state) == 765
    config = json.loads((tmp_path / "config.json").read_text())
    # the full model writes no architecture overrides: the official hard-coded model is what it describes
    assert config["encoder"] == HUB_CONFIG["encoder"] and config["decoder"] == HUB_CONFIG["decoder"]
    for key in ("mask_ratio", "fourier_loss_weight", "mask_fourier_loss", "return_channelwise_embeddings",
                "use_MAE_weight_init"):
        assert key in config


def test_from_config_accepts_a_config_json_path(tiny_dir):
    model = MAEModel.from_config(tiny_dir / "config.json")
    assert model.config.encoder.embed_dim == 32 and model.training


# --- errors ---------------------------------------------------------------------------------------------------


def _copy(tiny_dir, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, out, ignore=shutil.ignore_patterns("golden*", "alt_*", "README.md"))
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o644)
    return out


def _state(tiny_dir):
    with open(tiny_dir / "model.safetensors", "rb") as f:
        return torch.load(f, weights_only=True)["state_dict"]


@pytest.mark.parametrize(("path", "message"), [
    ("does/not/exist/here", "does not exist"),
    ("recursionpharma/OpenPhenom", "never downloads weights"),
])
def test_bad_paths(path, message):
    with pytest.raises(CheckpointError, match=message):
        MAEModel.from_pretrained(path)


def test_file_instead_of_directory(tiny_dir):
    with pytest.raises(CheckpointError, match="pass the checkpoint directory"):
        MAEModel.from_pretrained(tiny_dir / "model.safetensors")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("config.json", None, "config.json is missing"),
    ("model.safetensors", None, "model.safetensors is missing"),
    ("config.json", b"{not json", "not valid JSON"),
    ("model.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
    ("model.safetensors", b"<!DOCTYPE html><html>rate limited</html>", "neither a torch zip.*cut short"),
])
def test_broken_files(tiny_dir, tmp_path, name, content, message):
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / name).unlink()
    if content is not None:
        (ckpt / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        MAEModel.from_pretrained(ckpt)


CUT_SHORT = "is not a complete checkpoint .*the download was probably cut short or saved an error page"


@pytest.mark.parametrize("container", ["torch", "safetensors"])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.97, 0.9999])
def test_download_cut_short(tiny_dir, tmp_path, container, fraction):
    """A weights file cut anywhere, in either container, gets the message an HTML error page gets, not a raw
    OSError / SafetensorError."""
    ckpt = tmp_path / "ckpt"
    MAEModel.from_pretrained(tiny_dir).save_pretrained(ckpt, container=container)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CheckpointError, match=CUT_SHORT):
        MAEModel.from_pretrained(ckpt)


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_never_run(tiny_dir, tmp_path, capsys):
    ckpt = _copy(tiny_dir, tmp_path)
    torch.save({"state_dict": _state(tiny_dir), "extra": _Payload()}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="never runs pickled code"):
        MAEModel.from_pretrained(ckpt)
    assert "pickled code ran" not in capsys.readouterr().out


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("decoder_pred.bias"), "1 missing: decoder_pred.bias"),
    (lambda s: s.update({"head.weight": torch.zeros(3, 32)}), "1 unexpected: head.weight"),
    (lambda s: s.update({"decoder_pred.bias": torch.zeros(7)}),
     r"decoder_pred.bias: checkpoint \[7\] vs model \[256\]"),
])
def test_key_and_shape_mismatches_are_listed(tiny_dir, tmp_path, edit, message):
    ckpt = _copy(tiny_dir, tmp_path)
    state = _state(tiny_dir)
    edit(state)
    torch.save({"state_dict": state}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        MAEModel.from_pretrained(ckpt)


def test_wrapper_prefix_is_diagnosed(tiny_dir, tmp_path):
    ckpt = _copy(tiny_dir, tmp_path)
    torch.save({"state_dict": {f"module.{k}": v for k, v in _state(tiny_dir).items()}}, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="wrapper prefix"):
        MAEModel.from_pretrained(ckpt)


def test_config_of_other_weights(tiny_dir, tmp_path, full_reference):
    """The full OpenPhenom config.json next to the tiny weights: every mismatch is named."""
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "config.json").write_text(json.dumps(full_reference["config_json_hub_reconstructed"]))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch: .*config.json belongs to these weights"):
        MAEModel.from_pretrained(ckpt)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["encoder"]["vit_backbone"]["vit_backbone"].update(emb_dim=64), r"cannot apply: \['emb_dim'\]"),
    (lambda d: d["encoder"]["vit_backbone"]["vit_backbone"].update(_target_="vit.vit_huge"), "'vit_huge'"),
    (lambda d: d["decoder"].update(dept=2), r"decoder has keys camae does not know: \['dept'\]"),
    (lambda d: d.pop("decoder"), "no 'decoder' section"),
    (lambda d: d["encoder"].update(channel_agnostic=False), "channel-agnostic checkpoints only"),
    (lambda d: d["decoder"].update(tokens_per_modality=128), "tokens_per_modality=128"),
])
def test_config_errors_name_the_key(edit, message):
    d = json.loads(json.dumps(HUB_CONFIG))
    edit(d)
    with pytest.raises(ConfigError, match=message):
        MAEConfig.from_json_dict(d)


def test_bias_routing_is_validated():
    with pytest.raises(ConfigError, match="bias_routing='old'"):
        MAEConfig.from_json_dict(HUB_CONFIG, bias_routing="old")


def test_genuine_safetensors_header_detection(tiny_dir, tmp_path):
    """A file with a safetensors-like length prefix but a lying header length is not taken for safetensors."""
    ckpt = _copy(tiny_dir, tmp_path)
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="neither a torch zip"):
        MAEModel.from_pretrained(ckpt)
