"""Mesh construction and logical-axis sharding: the model names its axes, the config maps them."""
