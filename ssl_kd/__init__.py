"""ssl_kd: self-supervised ViT pretraining and distillation with a cheaper teacher."""

__version__ = "0.1.0"
