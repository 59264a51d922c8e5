"""The SSLMedSAM2 module's library. Files without `slicer`/`qt` imports are tested headless (Testing/Python)."""
