"""Small configs shared by the tests: tiny enough for a busy 2-core machine."""

from imagetransformer import ImageTransformerConfig

ATTENTION_CONFIGS = {
    "global": dict(attention="global"),
    "local_1d": dict(attention="local_1d", block_length=8, memory_length=5),
    "local_2d": dict(attention="local_2d", query_shape=(2, 6), memory_flange=(1, 3)),
}


def tiny_config(
    kind: str = "local_1d", image_shape=(3, 4, 6), **overrides
) -> ImageTransformerConfig:
    params = dict(
        image_shape=image_shape,
        d_model=16,
        num_heads=2,
        ffn_size=32,
        num_layers=2,
        dropout=0.0,
        **ATTENTION_CONFIGS[kind],
    )
    params.update(overrides)
    return ImageTransformerConfig(**params)
