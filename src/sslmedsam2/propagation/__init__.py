"""Frames + seed masks -> per-slice, per-label SAM2 logits -> a 3D label map with confidences."""
