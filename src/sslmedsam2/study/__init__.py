"""The study workspace: images, ground truth, pseudo-labels with per-slice review state, refinement rounds."""
