"""camae: fine-tune and evaluate OpenPhenom's channel-agnostic masked autoencoder at cluster scale."""

from camae.model import MAEModel
from camae.model_config import DecoderConfig, EncoderConfig, MAEConfig

__all__ = ["MAEModel", "MAEConfig", "EncoderConfig", "DecoderConfig"]
__version__ = "0.1.0"
