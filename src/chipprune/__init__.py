"""chipprune: CHIP (CHannel Independence-based Pruning, Sui et al., NeurIPS 2021) for PyTorch CNNs.

The library's calls are in chipprune.api (docs/api.md); `prune_model`, `group_importance` and `CHIPImportance` serve
those who hold a bare nn.Module."""

__version__ = "0.1.0"

from .api import (  # noqa: E402
    Calibration,
    Execution,
    Int8Options,
    Int8Report,
    Metrics,
    Profile,
    Pruned,
    PruneReport,
    Run,
    Scores,
    Sizes,
    architecture,
    evaluate,
    export,
    export_int8,
    finetune,
    import_model,
    load_scores,
    profile,
    prune,
    score,
    train,
)
from .ci import channel_independence  # noqa: E402
from .files.modelfile import ModelFile, load_model  # noqa: E402
from .models import ARCHS, create_model  # noqa: E402
from .pruning.budgets import Flops, Latency, Ratio, Sparsity  # noqa: E402
from .pruning.graph import group_importance, prune_model  # noqa: E402
from .pruning.importance import CHIPImportance  # noqa: E402
from .training.loop import PRESETS, Config, TrainError  # noqa: E402

__all__ = [
    "ARCHS",
    "CHIPImportance",
    "Calibration",
    "Config",
    "Execution",
    "Flops",
    "Int8Options",
    "Int8Report",
    "Latency",
    "Metrics",
    "PRESETS",
    "ModelFile",
    "Profile",
    "PruneReport",
    "Pruned",
    "Ratio",
    "Run",
    "Scores",
    "Sizes",
    "Sparsity",
    "TrainError",
    "__version__",
    "architecture",
    "channel_independence",
    "create_model",
    "evaluate",
    "export",
    "export_int8",
    "finetune",
    "group_importance",
    "import_model",
    "load_model",
    "load_scores",
    "profile",
    "prune",
    "prune_model",
    "score",
    "train",
]
