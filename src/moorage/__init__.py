"""moorage: a self-hosted platform that puts language models into production."""

__version__ = "0.1.0"

from .config import Settings, load_settings  # noqa: E402
from .errors import MoorageError  # noqa: E402
from .refs import ModelRef, parse_ref  # noqa: E402
from .registry import Registry, export_model, import_models  # noqa: E402
from .runtime import Runtime, make_fake_model  # noqa: E402

__all__ = [
    "ModelRef",
    "MoorageError",
    "Registry",
    "Runtime",
    "Settings",
    "__version__",
    "export_model",
    "import_models",
    "load_settings",
    "make_fake_model",
    "parse_ref",
]
