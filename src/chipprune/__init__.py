"""chipprune: CHIP (CHannel Independence-based Pruning, Sui et al., NeurIPS 2021) for PyTorch CNNs."""

__version__ = "0.1.0"

from .ci import channel_independence  # noqa: E402
from .files.modelfile import ModelFile, import_weights, load_model  # noqa: E402
from .models import ARCHS, create_model  # noqa: E402
from .pruning.graph import group_importance, prune_model  # noqa: E402
from .pruning.importance import CHIPImportance  # noqa: E402
from .pruning.registry import prune, select_channels  # noqa: E402

__all__ = [
    "ARCHS",
    "CHIPImportance",
    "ModelFile",
    "channel_independence",
    "create_model",
    "group_importance",
    "import_weights",
    "load_model",
    "prune",
    "prune_model",
    "select_channels",
    "__version__",
]
