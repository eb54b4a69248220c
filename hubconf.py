"""torch.hub entry points: `torch.hub.load(CLONE_DIR, "m3ae_base", source="local")`.

    model = torch.hub.load(".", "m3ae_tiny", source="local")                       # fresh weights
    model = torch.hub.load(".", "m3ae_large", source="local", weights="ckpt/m3ae_large")  # your checkpoint
    model = torch.hub.load(".", "m3ae_base", source="local", image_size=224)       # config overrides

No weights are hosted: `weights` is a local directory or file `M3AE.from_pretrained` reads (a run or
converted directory, .safetensors, an official .pkl, an MAE .pth).
"""
# what building / loading a model imports (torch.hub refuses to load when one is missing): the tokenizer
# and YAML configs are for training and eval only
dependencies = ["torch", "numpy", "safetensors"]


def _model(preset: str, weights=None, **overrides):
    from m3ae_engine import M3AE, M3AEConfig
    if weights is True:
        raise ValueError("no M3AE weights are hosted for torch.hub: pass weights='PATH' to a local checkpoint "
                         "(python -m m3ae_engine.convert m3ae-to-torch converts the official ones)")
    if weights:
        return M3AE.from_pretrained(weights, **overrides)
    return M3AE(M3AEConfig.from_preset(preset, **overrides))


def m3ae_tiny(weights=None, **overrides):
    """M3AE tiny (64 wide, 2 blocks, 32 px images, patch 8): tests and CPU demos."""
    return _model("tiny", weights, **overrides)


def m3ae_small(weights=None, **overrides):
    """M3AE small encoder (384 / 12 / 6), official decoder (512 / 8 / 16)."""
    return _model("small", weights, **overrides)


def m3ae_base(weights=None, **overrides):
    """M3AE base encoder (768 / 12 / 12), official decoder."""
    return _model("base", weights, **overrides)


def m3ae_large(weights=None, **overrides):
    """M3AE large encoder (1024 / 24 / 16), official decoder."""
    return _model("large", weights, **overrides)


def m3ae_huge(weights=None, **overrides):
    """M3AE huge encoder (1280 / 32 / 16), official decoder."""
    return _model("huge", weights, **overrides)
