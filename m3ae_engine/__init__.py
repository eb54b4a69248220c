"""m3ae-engine: a kernel-optimised PyTorch engine for multimodal masked autoencoders (M3AE, MAE)."""
from . import ops  # noqa: F401
from .interop import pretrained as _pretrained
from .model import ConfigError, InputError, M3AE, M3AEConfig, M3AEOutput  # noqa: F401

# the model layer may not import the file formats above it: the package joins them
M3AE.from_pretrained = classmethod(_pretrained.from_pretrained)
M3AE.save_pretrained = _pretrained.save_pretrained

__version__ = "0.1.0"


def _register_source_kernels() -> None:
    """Make `m3ae_engine.kernels` importable from a source checkout (repo/kernels) when the
    package is used without an install (PYTHONPATH=.); installs map it with package_dir."""
    import importlib.abc
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = here.parent / "kernels" / "__init__.py"
    if (here / "kernels").is_dir() or not src.is_file():
        return

    class _SourceKernelsFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "m3ae_engine.kernels":
                return None
            return importlib.util.spec_from_file_location(name, src, submodule_search_locations=[str(src.parent)])

    if not any(type(f).__name__ == "_SourceKernelsFinder" for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceKernelsFinder())  # the checkout being run wins over an editable install of another tree


_register_source_kernels()
