"""Iterative nnU-Net refinement of pseudo-labels (FSL-nnUNet), as a resumable job with a JSON-lines event log."""
