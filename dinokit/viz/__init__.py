"""Pictures of what a network learned: attention maps, patch-feature PCA, embeddings in 2-D,
augmented views and the run's HTML report."""

from dinokit.viz.attention import AttentionMaps, attention_maps, top_mass_mask
from dinokit.viz.embeddings import plot_embeddings, project_2d
from dinokit.viz.inputs import NeedsViTError
from dinokit.viz.pca import patch_features, pca_rgb
from dinokit.viz.report import write_report
from dinokit.viz.views import save_views_grid

__all__ = ["AttentionMaps", "NeedsViTError", "attention_maps", "patch_features", "pca_rgb", "plot_embeddings",
           "project_2d", "save_views_grid", "top_mass_mask", "write_report"]
