"""Methods: one file each, registered by name (registry.py) under the contract of base.py."""

from ssl_kd.methods import dino, dmae, kd, scalekd, supervised, vitkd  # noqa: F401  (registers the built-in methods)
from ssl_kd.methods.registry import method_class, method_names, register, sections, unregister

DEFAULT_METHOD = "dino"  # what a config without `method:` trains

__all__ = ["DEFAULT_METHOD", "method_class", "method_names", "register", "sections", "unregister"]
