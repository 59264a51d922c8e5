"""The no-weights baseline: ITK's morphological contour interpolation between drawn slices, run in a worker
process of its own (ITK's and SimpleITK's libraries crash each other at interpreter exit)."""
