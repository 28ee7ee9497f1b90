"""dinokit: self-supervised pretraining of vision backbones with DINO.

The pieces, each usable in your own loop::

    from dinokit import TrainConfig, train                      # the whole thing
    from dinokit import MultiCropAugmentation, DINOHead, DINOLoss, VisionTransformer
    from dinokit import make_teacher, update_teacher, cosine, knn_classify
"""

from dinokit.config import ConfigError, TrainConfig
from dinokit.data.builtin import builtin_textures
from dinokit.data.folders import ImageList, scan_folder
from dinokit.data.transforms import MultiCropAugmentation, eval_transform
from dinokit.eval.embed import Embeddings, embed_images
from dinokit.eval.features import extract_features
from dinokit.eval.source import open_source
from dinokit.eval.knn import knn_classify, knn_evaluate
from dinokit.eval.linear import linear_probe
from dinokit.hub.export import export_backbone
from dinokit.hub.load import load_backbone
from dinokit.method.loss import DINOLoss
from dinokit.method.schedules import Schedules, cosine, linear_warmup
from dinokit.method.teacher import make_teacher, update_teacher
from dinokit.models.backbones import build_backbone
from dinokit.models.head import DINOHead
from dinokit.models.multicrop import MultiCropModel
from dinokit.models.vit import VisionTransformer, vit
from dinokit.train.loop import RunResult, train

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DINOHead", "DINOLoss", "Embeddings", "ImageList", "MultiCropAugmentation", "MultiCropModel", "RunResult",
    "Schedules", "TrainConfig", "VisionTransformer", "build_backbone", "builtin_textures", "cosine", "embed_images",
    "eval_transform", "export_backbone", "extract_features", "knn_classify", "knn_evaluate", "linear_probe",
    "linear_warmup", "load_backbone", "make_teacher", "open_source", "scan_folder", "train", "update_teacher", "vit",
]
