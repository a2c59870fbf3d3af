"""The model-card template, shipped inside the package as `timm_hybrid.model_cards`."""
