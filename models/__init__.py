"""Pure PyTorch models: usable on their own, never import Lightning, configs or data."""
