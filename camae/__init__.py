"""camae: fine-tune and evaluate OpenPhenom's channel-agnostic masked autoencoder at cluster scale.

`from camae import MAEModel` loads the model lazily, so processes that only decode data (Ray Data workers) do
not import torch and timm.
"""

__all__ = ["MAEModel", "MAEConfig", "EncoderConfig", "DecoderConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "MAEModel":
        from camae.model import MAEModel

        return MAEModel
    if name in ("MAEConfig", "EncoderConfig", "DecoderConfig"):
        from camae import model_config

        return getattr(model_config, name)
    raise AttributeError(f"module 'camae' has no attribute {name!r}")
